"""CocoStuff-27, DINO ViT-S/8 (paper setting).

Loss weights/shifts: the "Cocostuff27 vit small 1/31/22" block of the official
src/configs/train_config.yml (the file's *active* block is an unrelated "IAROA" one; HP's
CocoStuff config carries the same six numbers). Other values: official defaults (dim 70,
batch 16, 5000 steps, Adam 5e-4 / probes 5e-3, res 224, five-crop 0.5). Backbone: the 300-epoch
ViT-S/8 checkpoint the official code loads for vit_small/8.
"""

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "cocostuff27"
    c.data.root = "data/cocostuff27_five"
    c.data.n_classes = 27
    c.model.backbone = "dino_vits8_300ep"
    set_loss(c, pos_intra=(0.67, 0.08), pos_inter=(0.25, 0.02), neg_inter=(0.63, 0.66))
    return c
