"""The one table of model families, and the decoders loaded beside them. Adding a family is a new file in
models/ that defines FAMILY (see export/family.py) and one line here."""

from torch import nn

from ditrt.runtime.errors import ConfigError

from .family import Checkpoint, Family
from .models import dc_ae, dit, flux, mmdit, pixart, sana, vae_kl

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        dit.FAMILY,
        pixart.FAMILY,
        sana.FAMILY,
        mmdit.FAMILY,
        flux.FAMILY,
    )
}
DECODERS: tuple[Checkpoint, ...] = (vae_kl.CHECKPOINT, dc_ae.CHECKPOINT)

# diffusers `_class_name` -> what loads it
CHECKPOINTS: dict[str, Checkpoint] = {
    name: c for c in (*(f.checkpoint for f in FAMILIES.values()), *DECODERS) for name in c.classes
}


def family_of(model: nn.Module) -> Family:
    """The family whose module `model` is."""
    for family in FAMILIES.values():
        if type(model) is family.module:
            return family
    raise ConfigError(f"{type(model).__name__} is not a denoiser of any family ({', '.join(FAMILIES)})")
