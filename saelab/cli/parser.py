"""The `saelab` command's parser: subcommands, their options, and one --section.key flag per config field."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import yaml

from saelab.cli.sae_source import REPORT_DEFAULT, SAE_SOURCE_HELP, add_sae_source_options
from saelab.core.config import closest_key, field_docs


def _config_flags(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted flag name, help with default) for every field of a dataclass config, nested sections included."""
    hints = typing.get_type_hints(type(config))
    docs = field_docs(type(config))  # type: ignore[arg-type]  # a class is Hashable (python/mypy#11470)
    flags = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            flags += _config_flags(value, f"{prefix}{f.name}.")
        elif f.name != "sae":
            flags.append((prefix + f.name, f"{docs.get(f.name, '')} (default: {value})"))
    return flags


def _sae_flags() -> list[tuple[str, str]]:
    """One --sae.X flag per option of any architecture, saying which architectures take it."""
    from saelab.saes.config import SAEConfig
    from saelab.saes.registry import architecture_class, available_architectures

    common = {f.name for f in dataclasses.fields(SAEConfig)}
    flags: dict[str, tuple[str, list[str] | None]] = {name: (doc, None) for name, doc in field_docs(SAEConfig).items()}
    flags["expansion_factor"] = ("d_sae = expansion_factor * d_in when d_sae is not given.", None)
    flags["lr"] = ("This SAE's learning rate (default: train.lr).", None)
    flags["init_from"] = ("A saved SAE directory to start from instead of a random initialisation.", None)
    for arch in available_architectures():
        config_class = architecture_class(arch).config_class
        docs = field_docs(config_class)  # type: ignore[arg-type]  # a class is Hashable (python/mypy#11470)
        for f in dataclasses.fields(config_class):
            if f.name not in common:
                default = f.default
                if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                doc, archs = flags.get(f.name, (f"{docs.get(f.name, '')} (default: {default})", []))
                flags[f.name] = (doc, [*(archs or []), arch])
    return [(f"sae.{name}", doc + (f" [{', '.join(archs)}]" if archs else "")) for name, (doc, archs) in flags.items()]


def _parse_value(text: str) -> Any:
    """Flag values are YAML scalars/lists: 32 -> int, 3e-4 -> float, null -> None, [1, 2] -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads '3e-4' and '1e30' as strings
        except ValueError:
            return value
    return value


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _add_config_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, str]]) -> None:
    for name, doc in flags:
        parser.add_argument(f"--{name}", dest=name, metavar="VALUE", default=argparse.SUPPRESS, help=doc)


def overrides(args: argparse.Namespace, flag_names: list[str]) -> dict:
    data: dict = {}
    for name in flag_names:
        if hasattr(args, name):
            _set_dotted(data, name, _parse_value(getattr(args, name)))
    return data


def _data_flags() -> list[tuple[str, str]]:
    from saelab.data.config import DataConfig
    from saelab.models.config import ModelConfig

    return _config_flags(ModelConfig(), "model.") + _config_flags(DataConfig(), "data.")


def _suite_flags() -> list[tuple[str, str]]:
    """--<eval>.<setting> for the suite's evals beyond core (whose settings are eval's own flags)."""
    from saelab.evals.suite import config_classes

    return [
        flag
        for name, config in config_classes().items()
        if name != "core"
        for flag in _config_flags(config(), f"{name}.")
    ]


class _ExactParser(argparse.ArgumentParser):
    """Options match whole names only (argparse would take `--train.k 3` as `--train.keep_checkpoints 3`), and
    the parser remembers its long options so that an unknown one gets the closest name. Subcommands' parsers are
    of this class too."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.long_options: list[str] = []  # before argparse's __init__, which adds --help
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        self.long_options += [name[2:] for name in names if isinstance(name, str) and name.startswith("--")]
        return super().add_argument(*names, **kwargs)


def build_parser() -> tuple[_ExactParser, dict[str, _ExactParser], dict[str, list[str]]]:
    """The parser, its subcommands' parsers, and per command the dotted config flags it accepts."""
    from saelab.runs.config import RunConfig

    parser = _ExactParser(prog="saelab", description="Train and study sparse autoencoders.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (by default a user error is one line)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    flag_names: dict[str, list[str]] = {}

    train = commands.add_parser(
        "train",
        help="train SAEs (with no flags: a TopK SAE on the residual stream of SmolLM2-135M-Instruct (Q4_1 GGUF, "
        "run in float32) and the built-in text)",
        description="Train SAEs. Settings come from the defaults, then --config FILE (YAML), then --section.key flags.",
    )
    train.add_argument("--config", metavar="FILE", help="YAML run config (see examples/)")
    train.add_argument(
        "--resume",
        metavar="OUT_DIR",
        help="continue the run in OUT_DIR from its newest checkpoint; only --train.total_tokens (to "
        "extend it) and the logging, evaluation and checkpoint options may be given with it",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out_dir (by default a folder holding a run is refused)",
    )
    flags = _config_flags(RunConfig()) + _sae_flags()
    _add_config_flags(train, flags)
    flag_names["train"] = [name for name, _ in flags]

    pretokenize = commands.add_parser(
        "pretokenize",
        help="tokenise and pack a dataset into token shards (use the folder as --data.dataset)",
        description="Tokenise data.dataset with model.name's tokenizer, pack it into contexts and save token shards.",
    )
    cache = commands.add_parser(
        "cache-activations",
        help="run the model over a dataset once and store its activations (train from it with --data.cache)",
        description="Harvest activations at model.hook_name (or --hooks) into sharded safetensors files.",
    )
    for command in (pretokenize, cache):
        command.add_argument("--config", metavar="FILE", help="YAML run config whose model and data sections are used")
        command.add_argument("--out", metavar="DIR", required=True, help="output folder (must not exist or be empty)")
    pretokenize.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    cache.add_argument("--max_tokens", type=int, default=1_000_000, help="activation rows to store (default: 1000000)")
    cache.add_argument("--hooks", metavar="NAMES", help="comma-separated hook points (default: model.hook_name)")
    cache.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="storage dtype of the activations (default: float32)",
    )
    cache.add_argument("--shard_rows", type=int, default=65536, help="activation rows per shard file (default: 65536)")
    evaluate = commands.add_parser(
        "eval",
        help="evaluate saved SAEs: reconstruction, sparsity, spliced CE/KL; with --suite also geometry, "
        "absorption, sparse probing, auto-interpretation; JSON results, plots, a comparison",
        description="Evaluate SAEs on their model and data (from their files; --model_name, --hook_name, --model.* "
        "and --data.* override them). One SAE and no --suite: the core metrics on held-out contexts, printed and "
        "written as eval.json and PNG plots. --suite (or several SAEs): each eval named, results as JSON in "
        "SAEBench's layout (<out>/<SAE>/<eval>.json), comparison plots, comparison.md/.csv and index.html. "
        "Each eval's settings are --<eval>.<setting> flags.",
    )
    evaluate.add_argument("sae_dir", metavar="SAE", nargs="+", help=SAE_SOURCE_HELP + " (several: compared)")
    evaluate.add_argument(
        "--suite",
        metavar="EVALS",
        default=None,
        help="comma-separated evals: core, geometry, absorption, probing, autointerp, or all (those five); "
        "replacement for a cross-layer transcoder or transcoder set (default: core alone, written as eval.json "
        "beside the SAE)",
    )
    evaluate.add_argument(
        "--names", metavar="NAMES", default=None, help="comma-separated names of the SAEs (default: folder names)"
    )
    evaluate.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help=f"output folder (without --suite: for eval.json and the plots, {REPORT_DEFAULT}; with --suite: "
        "default <SAE folder>/evals for one SAE, ./saelab-evals for several)",
    )
    evaluate.add_argument(
        "--n_contexts",
        type=int,
        default=32,
        help="held-out contexts evaluated, of each source of a built-in corpus (default: 32)",
    )
    evaluate.add_argument("--batch_contexts", type=int, default=8, help="contexts per forward pass (default: 8)")
    evaluate.add_argument("--no_spliced", action="store_true", help="skip the downstream CE/KL passes (faster)")
    evaluate.add_argument("--no_error_term", action="store_true", help="skip the SAE + error-term check pass")
    dashboard = commands.add_parser(
        "dashboard",
        help="per-latent statistics over a corpus and a static HTML dashboard (optionally Neuronpedia files)",
        description="Run an SAE over contexts of its model and data (from its files; --model_name, --hook_name, "
        "--model.* and --data.* override them), save feature_stats.safetensors and write a static HTML dashboard "
        "that opens from disk.",
    )
    dashboard.add_argument("sae_dir", metavar="SAE", help=SAE_SOURCE_HELP)
    dashboard.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="dashboard folder (default: dashboard/ beside feature_stats.safetensors, which goes in "
        f"the folder eval writes to: {REPORT_DEFAULT})",
    )
    dashboard.add_argument("--n_contexts", type=int, default=256, help="contexts run through the model (default: 256)")
    dashboard.add_argument("--batch_contexts", type=int, default=8, help="contexts per forward pass (default: 8)")
    dashboard.add_argument(
        "--top_k", type=int, default=16, help="top-activating contexts kept per latent (default: 16)"
    )
    dashboard.add_argument(
        "--window_left", type=int, default=24, help="tokens shown before a context's maximum (default: 24)"
    )
    dashboard.add_argument("--window_right", type=int, default=8, help="tokens shown after it (default: 8)")
    dashboard.add_argument("--chunk_size", type=int, default=64, help="latents per data file of the site (default: 64)")
    dashboard.add_argument(
        "--autointerp",
        metavar="FILE",
        default=None,
        help="an autointerp.json of `saelab eval --suite autointerp`: its explanations and scores are shown",
    )
    dashboard.add_argument(
        "--neuronpedia", metavar="DIR", default=None, help="also write Neuronpedia upload batch files into DIR"
    )
    dashboard.add_argument(
        "--neuronpedia_model_id", default=None, help="Neuronpedia model id (default: the SAE's model_name)"
    )
    dashboard.add_argument(
        "--neuronpedia_sae_set", default=None, help="Neuronpedia SAE set name (default: the hook name)"
    )
    graph = _graph_parser(commands)
    upload = commands.add_parser(
        "upload",
        help="upload a saved SAE folder to the Hugging Face hub",
        description="Upload SAE to REPO_ID (created if needed). A saelab/SAELens folder is uploaded as it is; "
        "other formats saelab reads (and SAEs given --model_name/--hook_name) are converted to the SAELens layout "
        "first. Log in with `hf auth login` or set HF_TOKEN.",
    )
    upload.add_argument("sae_dir", metavar="SAE", help=SAE_SOURCE_HELP)
    upload.add_argument("repo_id", metavar="REPO_ID", help="hub repository, owner/name")
    upload.add_argument("--path_in_repo", default=None, help="folder inside the repository (default: its root)")
    upload.add_argument("--private", action="store_true", help="create the repository as private")
    upload.add_argument("--message", default="Upload SAE with saelab", help="commit message")
    convert = commands.add_parser(
        "convert",
        help="convert an SAE folder of any format saelab reads to saelab/SAELens, sparsify or circuit-tracer's layout",
        description="Load SOURCE (saelab/SAELens, sparsify, dictionary_learning, Gemma Scope, e2e_sae, circuit-tracer; "
        "local, a hub repo or a release) and write OUT. A transcoder set goes to SAELens as one transcoder folder per "
        "layer (OUT/layer_L/); circuit-tracer's layout holds transcoder sets and cross-layer transcoders.",
    )
    convert.add_argument("source", metavar="SOURCE", help=SAE_SOURCE_HELP)
    convert.add_argument("out", metavar="OUT", help="output folder")
    convert.add_argument(
        "--to",
        choices=["saelens", "sparsify", "circuit-tracer"],
        default="saelens",
        help="layout written (default: saelens)",
    )
    for command in (evaluate, dashboard, graph, upload, convert):
        add_sae_source_options(command, with_model=command in (evaluate, dashboard))
    flags = _data_flags()
    flag_names["upload"] = flag_names["convert"] = flag_names["graph"] = []
    for command, name in (
        (pretokenize, "pretokenize"),
        (cache, "cache-activations"),
        (evaluate, "eval"),
        (dashboard, "dashboard"),
    ):
        _add_config_flags(command, flags)
        flag_names[name] = [n for n, _ in flags]
    suite_flags = _suite_flags()
    _add_config_flags(evaluate, suite_flags)
    flag_names["eval"] += [n for n, _ in suite_flags]
    subparsers = {
        "train": train,
        "pretokenize": pretokenize,
        "cache-activations": cache,
        "eval": evaluate,
        "dashboard": dashboard,
        "graph": graph,
        "upload": upload,
        "convert": convert,
    }
    return parser, subparsers, flag_names


def _graph_parser(commands) -> _ExactParser:
    graph = commands.add_parser(
        "graph",
        help="the attribution graph of a prompt through a cross-layer transcoder or transcoder set: circuit-tracer "
        "/ Neuronpedia JSON and a page that draws it",
        description="Compute the attribution graph (Ameisen et al. 2025) of PROMPT's next token in the local "
        "replacement model of the transcoder's model (attention patterns and norm denominators frozen, errors "
        "held), prune it by influence on the logits, and write it as JSON that circuit-tracer's and Neuronpedia's "
        "graph viewers read, plus graph.html, a page drawing it that opens from disk.",
    )
    graph.add_argument("sae_dir", metavar="CLT", help="a cross-layer transcoder or transcoder set: " + SAE_SOURCE_HELP)
    graph.add_argument("prompt", metavar="PROMPT", help="the text whose next token is attributed")
    graph.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help=f"output folder (default: graphs/ in the folder eval writes to: {REPORT_DEFAULT})",
    )
    graph.add_argument("--model", default=None, help="the model to run (default: the transcoder's model_name)")
    graph.add_argument(
        "--dtype", default="float32", help="the model's dtype: float32, bfloat16, float16 or auto (default: float32)"
    )
    graph.add_argument("--slug", default=None, help="the graph's name in its files (default: from the prompt)")
    graph.add_argument("--scan", default=None, help="the model id the viewer shows (default: the model's name)")
    graph.add_argument(
        "--max_feature_nodes",
        type=int,
        default=7500,
        help="at most this many feature nodes, the most influential (default: 7500)",
    )
    graph.add_argument(
        "--node_threshold", type=float, default=0.8, help="keep the nodes carrying this share of influence (0.8)"
    )
    graph.add_argument(
        "--edge_threshold", type=float, default=0.98, help="keep the edges carrying this share of influence (0.98)"
    )
    graph.add_argument("--max_n_logits", type=int, default=10, help="at most this many logit nodes (default: 10)")
    graph.add_argument(
        "--desired_logit_prob",
        type=float,
        default=0.95,
        help="the most likely next tokens whose probabilities add up to this are logit nodes (default: 0.95)",
    )
    graph.add_argument("--batch_size", type=int, default=64, help="targets per backward pass (default: 64)")
    return graph


def suggest_unknown(unknown: list[str], flag_names: list[str], command: str) -> str:
    flag = unknown[0].split("=")[0]
    hint = closest_key(flag.lstrip("-"), flag_names)
    return f"unknown option {flag}" + (f"; did you mean --{hint}?" if hint else "") + f" (see saelab {command} --help)"
