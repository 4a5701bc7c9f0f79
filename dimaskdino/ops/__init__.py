"""Public ops. Model code imports only from here; each op has a pure-PyTorch `<op>_ref`."""

from dimaskdino.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_ref

__all__ = ["ms_deform_attn", "ms_deform_attn_ref"]
