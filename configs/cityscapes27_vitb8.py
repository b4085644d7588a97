"""Cityscapes-27, DINO ViT-B/8 (the released cityscapes_vit_base_1.ckpt setting).

From the checkpoint's hparams (issue #26 of the official repository): dim 100, batch 32,
7000 steps, pointwise False, five-crop 0.5, res 224. Loss weights/shifts: the "Cityscapes 10/3"
block of the official train_config.yml (the checkpoint dump is truncated before them).
"""

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "cityscapes27"
    c.data.root = "data/cityscapes27_five"
    c.data.n_classes = 27
    c.model.backbone = "dino_vitb8"
    c.model.dim = 100
    c.batch_size = 32
    c.num_steps = 7000
    c.loss.pointwise = False
    set_loss(c, pos_intra=(1.0, 0.45828472207), pos_inter=(0.577453483136995, 0.1754346515479633),
             neg_inter=(0.9058762625226623, 0.31361241889448443))
    return c
