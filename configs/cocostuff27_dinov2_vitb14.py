"""CocoStuff-27, DINOv2 ViT-B/14 (the hub's dinov2_vitb14; `--config ...:reg` for dinov2_vitb14_reg).

No published STEGO run on DINOv2 with its hyperparameters was found (neither the STEGO paper nor
its official code has one), so the loss weights/shifts are the ViT-B/8 ones of
configs/cocostuff27_vitb8.py (the "Cocostuff27 10/3 vit_base" block of the official
train_config.yml), not tuned for DINOv2. Patch 14: the training crops are 224 = 16 x 14 pixels
as in the official setting, and evaluation runs at 322 = 23 x 14 (the official 320 is not a
multiple of 14, and trailing pixels would be dropped by the backbone).
"""

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    if arg not in ("", "reg"):
        raise ValueError(f"config argument {arg!r}: use nothing (dinov2_vitb14) or 'reg'")
    c = base_config()
    c.data.name = "cocostuff27"
    c.data.root = "data/cocostuff27_five"
    c.data.n_classes = 27
    c.data.res = 224
    c.model.backbone = "dinov2_vitb14_reg" if arg == "reg" else "dinov2_vitb14"
    c.model.patch_size = 14
    c.eval.res = 322
    set_loss(c, pos_intra=(0.1, 0.12), pos_inter=(1.0, 0.2), neg_inter=(0.1538476246415498, 1.0))
    return c
