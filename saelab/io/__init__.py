"""Reading and writing SAEs and training state: atomic files, SAELens layout, other libraries' layouts,
checkpoints."""

from saelab.core.files import FileFormatError, atomic_write_bytes, atomic_write_text
from saelab.io.circuit_tracer import load_circuit_tracer, save_circuit_tracer
from saelab.io.load import load_sae
from saelab.io.saelens_format import load_saelens_layers, load_sparsity, save_saelens_layers
from saelab.io.sparsify_format import load_sparsify, save_sparsify
from saelab.saes.files import save_sae

__all__ = [
    "FileFormatError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_circuit_tracer",
    "load_sae",
    "load_saelens_layers",
    "load_sparsify",
    "load_sparsity",
    "save_circuit_tracer",
    "save_sae",
    "save_saelens_layers",
    "save_sparsify",
]
