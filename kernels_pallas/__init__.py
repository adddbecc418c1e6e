"""Pallas kernels for diffusion-LM attention (block-sparse bidirectional, cache reuse).

Standalone: nothing here imports `dlmjax`. The kernels land with the kernels issue; until then the model's
attention dispatch (`dlmjax.models.attention`) runs its XLA path and this package only reserves the name.
"""

__all__: list[str] = []
