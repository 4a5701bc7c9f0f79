// Every op schema of the project in one table. Implementations register per dispatch key in
// their own folders (TORCH_LIBRARY_IMPL); fake (meta) kernels and autograd are registered from
// Python in dimaskdino/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dimaskdino, m) {
  // value (B,S,H,D); spatial_shapes (L,2) int64 (h,w); level_start_index (L,) int64;
  // sampling_locations (B,Q,H,L,P,2) normalized (x,y); attention_weights (B,Q,H,L,P).
  // Returns (B,Q,H*D) in value's dtype.
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights), each in the dtype of
  // the matching input.
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // data: the bytes of a JPEG file (1-D uint8, CPU). Returns 0 when every Huffman code of a
  // baseline JPEG decodes and the data ends where the last block does; 1 premature end, 2 bytes
  // after the last block, 3 bad Huffman code, 4 bad restart marker, 5 bad structure; -1 not
  // checked (progressive, lossless, arithmetic-coded). See csrc/jpeg/jpeg_scan_check.cpp.
  m.def("jpeg_scan_check(Tensor data) -> int");
}

// `import dimaskdino._C` runs the static registrations above; the module itself has no functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
