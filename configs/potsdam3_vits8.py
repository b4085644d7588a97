"""Potsdam-3, DINO ViT-S/8 (the released potsdam_test.ckpt setting).

Checkpoint hparams (issue #39): vit_small, no crop, batch 16, 5000 steps, res 224. Loss
weights/shifts: the "Potsdam vit small 1/31/22" block of the official train_config.yml (the
block active in the repository's first commit).
"""

from stego_jax.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "potsdam3"
    c.data.root = "data/potsdam"
    c.data.crop_type = None
    c.data.n_classes = 3
    c.model.backbone = "dino_vits8_300ep"
    c.loss.pos_intra_weight, c.loss.pos_inter_weight, c.loss.neg_inter_weight = 0.67, 0.25, 0.63
    c.loss.pos_intra_shift, c.loss.pos_inter_shift, c.loss.neg_inter_shift = 0.08, 0.02, 0.46
    return c
