"""OKD's online modules: the trainable part of an adapted teacher, one class per ``online.kind``.

* :mod:`okd.online.base`: the :class:`OnlineModule` interface, the registry :data:`ONLINE_MODULES`
  (``online.kind`` -> class), :func:`build_online_module` and :func:`with_online_module` (fold a saved
  module into a plain Hugging Face model);
* :mod:`okd.online.adapter`: ``adapter``, a residual bottleneck on the final hidden state;
* :mod:`okd.online.lora`: ``lora``, peft LoRA on the top layers (``lora_top_layers=0``: all layers);
* :mod:`okd.online.objective`: what the module optimises (CE, the divergence toward the detached
  student in a chosen direction, the anchor to the frozen teacher), when and how fast it updates
  (delayed start, learning-rate schedule), what the student learns from (``teacher_mix``), and the
  adapted-teacher metrics.

Both kinds start as the identity (the adapter's up-projection, resp. LoRA's B matrix, is zero), so at
step 0 the adapted teacher's logits equal the pretrained teacher's exactly.
"""

from okd.online.base import (
    META_FILE,
    ONLINE_MODULES,
    NoOnlineModule,
    OnlineModule,
    OnlineModuleConfig,
    build_online_module,
    online_module_class,
    register_online_module,
    with_online_module,
)
from okd.online.adapter import AdapterModule, ResidualAdapter  # noqa: E402  (registers "adapter")
from okd.online.lora import LoraModule  # noqa: E402  (registers "lora")

__all__ = [
    "META_FILE",
    "ONLINE_MODULES",
    "AdapterModule",
    "LoraModule",
    "NoOnlineModule",
    "OnlineModule",
    "OnlineModuleConfig",
    "ResidualAdapter",
    "build_online_module",
    "online_module_class",
    "register_online_module",
    "with_online_module",
]
