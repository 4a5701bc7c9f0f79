"""Public ops. Model code imports only from here; each op has a pure-PyTorch `<op>_ref`."""

from dimaskdino.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_ref

__all__ = ["ms_deform_attn", "ms_deform_attn_ref"]
from dimaskdino.ops.bato_attention import bato_attention, bato_attention_ref  # noqa: E402
from dimaskdino.ops.topk_select import (  # noqa: E402
    class_max_scores,
    class_max_scores_ref,
    topk_select,
    topk_select_ref,
)

__all__ += ["bato_attention", "bato_attention_ref", "class_max_scores", "class_max_scores_ref", "topk_select", "topk_select_ref"]
from dimaskdino.ops.mask_loss import (  # noqa: E402
    matched_mask_logits,
    point_mask_costs,
    point_mask_costs_ref,
    point_mask_loss,
    point_mask_loss_ref,
    sample_point_features,
)

__all__ += [
    "matched_mask_logits", "point_mask_costs", "point_mask_costs_ref", "point_mask_loss", "point_mask_loss_ref",
    "sample_point_features",
]
