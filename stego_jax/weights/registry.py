"""Named DINO, DINOv2 and DINOv3 backbone checkpoints: where each is published and which ViT it
holds."""

from __future__ import annotations

import dataclasses
import re

# The official host (facebookresearch/dino:hubconf.py, mhamilton723/STEGO:src/modules.py).
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/dino"
# The DINOv2 host (facebookresearch/dinov2:dinov2/hub/utils.py `_DINOV2_BASE_URL`).
DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One published checkpoint: its path under the base URL and the architecture it must hold.

    `sha256` pins the exact file at the official URL, `sha256_source` says where that digest was
    published; every load (downloaded or placed by hand) is then checked against it. When None,
    the checksum of the first file seen is recorded next to the cached file, every later load is
    checked against that, and `load_dino` warns once that the first file was trusted.
    """

    name: str
    path: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    sha256: str | None = None
    sha256_source: str | None = None
    # "dino" (DINO v1 ViT), "dinov2" or "dinov3"; the host the path is under (none for DINOv3:
    # its files are never downloaded); DINOv2 register / DINOv3 storage tokens.
    family: str = "dino"
    base_url: str = DEFAULT_BASE_URL
    num_register_tokens: int = 0

    def __post_init__(self) -> None:
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.sha256 is not None and not self.sha256_source:
            raise ValueError(f"{self.name}: a pinned sha256 needs its sha256_source (where it was published)")

    @property
    def filename(self) -> str:
        """The cached file's name (the last component of the URL path)."""
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str) -> str:
        """The download URL under `base_url` (no trailing slash needed)."""
        return base_url.rstrip("/") + "/" + self.path


# No digests are pinned: the host publishes none for these files (the DINO README and hubconf.py
# give URLs only, and the file names carry no hash prefix as torch.hub's do). Pin one here, with
# its source, once a digest of the exact file at the exact URL is published.
REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        WeightSpec(
            "dino_vits16", "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 16, 384, 12, 6
        ),
        WeightSpec(
            "dino_vits8", "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", 8, 384, 12, 6
        ),
        # The ViT-S/8 the official STEGO code loads (a 300-epoch run, not the hub's dino_vits8).
        WeightSpec(
            "dino_vits8_300ep",
            "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
            8,
            384,
            12,
            6,
        ),
        WeightSpec(
            "dino_vitb16", "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 16, 768, 12, 12
        ),
        WeightSpec(
            "dino_vitb8", "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 8, 768, 12, 12
        ),
    )
}



def _dinov2(arch: str, embed_dim: int, depth: int, heads: int, reg: bool) -> WeightSpec:
    # dinov2/hub/backbones.py: f"{base}/{model_base_name}/{model_full_name}_pretrain.pth", the
    # full name carrying "_reg4" for the register models.
    name = f"dinov2_{arch}14" + ("_reg" if reg else "")
    stem = f"dinov2_{arch}14"
    return WeightSpec(
        name,
        f"{stem}/{stem}{'_reg4' if reg else ''}_pretrain.pth",
        14,
        embed_dim,
        depth,
        heads,
        family="dinov2",
        base_url=DINOV2_BASE_URL,
        num_register_tokens=4 if reg else 0,
    )


# DINOv2 hub checkpoints (the URLs of the dinov2 README and hub builders). Unpinned for the same
# reason as the DINO ones: neither the README nor the hub code publishes a digest, and the file
# names carry no hash prefix (torch.hub loads them without check_hash).
DINOV2_REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for reg in (False, True)
    for s in (
        _dinov2("vits", 384, 12, 6, reg),
        _dinov2("vitb", 768, 12, 12, reg),
        _dinov2("vitl", 1024, 24, 16, reg),
        _dinov2("vitg", 1536, 40, 24, reg),
    )
}


# DINOv3 ViTs (dinov3/hub/backbones.py, LVD-1689M weights). They are released under the DINOv3
# License after a request (DINOV3_REQUEST_URL, the download page linked from the official
# README); the download links are sent by e-mail, so nothing is downloaded here: `path` is the
# official file name (`_make_dinov3_vit_model_url`: dinov3_<arch>_pretrain_lvd1689m-<hash>.pth),
# looked up in a local folder by `stego_jax.weights.load_backbone`.
DINOV3_REQUEST_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
DINOV3_REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        WeightSpec(
            f"dinov3_{arch}", f"dinov3_{arch}_pretrain_lvd1689m-{digest}.pth", 16, dim, depth,
            heads, family="dinov3", base_url="", num_register_tokens=4,
        )
        for arch, dim, depth, heads, digest in (
            ("vits16", 384, 12, 6, "08c60483"),
            ("vits16plus", 384, 12, 6, "4057cbaa"),
            ("vitb16", 768, 12, 12, "73cec8be"),
            ("vitl16", 1024, 24, 16, "8aa4cbdd"),
        )
    )
}


def is_registered(name: object) -> bool:
    """Whether `name` is a registry name of any family."""
    return isinstance(name, str) and (
        name in REGISTRY or name in DINOV2_REGISTRY or name in DINOV3_REGISTRY
    )


def get_spec(name: str) -> WeightSpec:
    """Looks up a registry name; ValueError listing the known names otherwise."""
    known = {**REGISTRY, **DINOV2_REGISTRY, **DINOV3_REGISTRY}
    try:
        return known[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone checkpoint {name!r}: known names are {sorted(known)}; "
            "or pass the path of a local .pth/.pt/.safetensors/.npz file"
        ) from None
