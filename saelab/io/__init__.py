"""Reading and writing SAEs and training state: atomic files, SAELens layout, other libraries' layouts,
checkpoints."""

from saelab.core.files import FileFormatError, atomic_write_bytes, atomic_write_text
from saelab.io.load import load_sae
from saelab.io.saelens_format import load_sparsity
from saelab.io.sparsify_format import load_sparsify, save_sparsify
from saelab.saes.files import save_sae

__all__ = [
    "FileFormatError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_sae",
    "load_sparsify",
    "load_sparsity",
    "save_sae",
    "save_sparsify",
]
