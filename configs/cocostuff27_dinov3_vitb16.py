"""CocoStuff-27, DINOv3 ViT-B/16 (the hub's dinov3_vitb16, LVD-1689M weights).

DINOv3 weights are released after a request (see stego_jax.weights.load_backbone): put the
official dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth in $STEGO_JAX_DINOV3_DIR (default
~/.cache/stego_jax/weights/dinov3) or set model.backbone to its path.

No published STEGO run on DINOv3 was found (neither the STEGO paper nor its official code has
one), so the loss weights/shifts are the ViT-B/8 ones of configs/cocostuff27_vitb8.py (the
"Cocostuff27 10/3 vit_base" block of the official train_config.yml), not tuned for DINOv3.
Patch 16: training crops 224 = 14 x 16 and evaluation at the official 320 = 20 x 16, both
multiples of the patch.
"""

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"config argument {arg!r}: this config takes none")
    c = base_config()
    c.data.name = "cocostuff27"
    c.data.root = "data/cocostuff27_five"
    c.data.n_classes = 27
    c.data.res = 224
    c.model.backbone = "dinov3_vitb16"
    c.model.patch_size = 16
    c.eval.res = 320
    set_loss(c, pos_intra=(0.1, 0.12), pos_inter=(1.0, 0.2), neg_inter=(0.1538476246415498, 1.0))
    return c
