"""Reading and writing SAEs and training state: atomic files, SAELens layout, checkpoints."""

from saelab.io.atomic import atomic_write_bytes, atomic_write_text
from saelab.io.saelens_format import FileFormatError, load_sae, load_sparsity, save_sae

__all__ = ["FileFormatError", "atomic_write_bytes", "atomic_write_text", "load_sae", "load_sparsity", "save_sae"]
