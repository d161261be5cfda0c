"""The eval suite: several evals of several SAEs in one call, each result in SAEBench's envelope, one comparison.

    results = run_suite({"k32": sae_a, "k64": sae_b}, ["core", "geometry", "absorption"], out="evals/")

gives `results["k32"]["absorption"]`, and with `out` writes `evals/<sae>/<eval>.json`, each eval's comparison
plots, `comparison.md`/`comparison.csv` (one row per SAE, the headline number of each eval) and `index.html`
(the suite's dashboard page: table, plots, and the auto-interpretation explanations). `saelab eval A B --suite ...`
is this function. Each eval also runs alone: `run_geometry`, `run_absorption`, `run_probing`, `run_autointerp`,
`run_replacement`, and `run_core` here (`evaluate` in the suite's envelope). A cross-layer transcoder (or transcoder
set) has one eval, `replacement`; every other eval measures an SAE or transcoder at one hook point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.core.config import PYDANTIC, closest, from_dict
from saelab.core.errors import ConfigError, SaelabError
from saelab.core.files import atomic_write_text
from saelab.data.config import DataConfig
from saelab.evals.results import make_result, write_result
from saelab.saes.base import SAE
from saelab.saes.clt import CrossLayerTranscoder


@dataclass
class CoreConfig:
    """Settings of the core eval: `evaluate` (reconstruction, sparsity, spliced CE/KL on held-out contexts)."""

    __pydantic_config__ = PYDANTIC

    n_contexts: int = 32
    """Held-out contexts evaluated, of each source of a built-in corpus."""
    batch_contexts: int = 8
    """Contexts per forward pass of the model."""
    spliced: bool = True
    """Run the model with the SAE spliced in (CE/KL scores): three more forward passes of the whole model."""
    error_term: bool = True
    """Also check that SAE output + error term gives the clean model's logits back (one more pass)."""


def run_core(
    sae: SAE, model=None, config: CoreConfig | None = None, progress: bool = True, data: DataConfig | None = None
) -> dict[str, Any]:
    """`evaluate` as a suite result: SAEBench's core categories (model_behavior_preservation,
    model_performance_preservation, reconstruction_quality, shrinkage, sparsity), one detail record per source of a
    built-in corpus, and `evaluate`'s whole result under `eval_result_unstructured`."""
    from saelab.evals.evaluate import evaluate

    config = config or CoreConfig()
    start = time.perf_counter()
    full = evaluate(
        sae, model, data, config.n_contexts, config.batch_contexts, error_term=config.error_term, spliced=config.spliced
    )
    reconstruction, sparsity, downstream = full["reconstruction"], full["sparsity"], full.get("downstream", {})
    metrics: dict[str, dict[str, float]] = {
        "reconstruction_quality": {
            "explained_variance": reconstruction["explained_variance"],
            "mse": reconstruction["mse"],
            "cossim": reconstruction["cosine_similarity"],
        },
        "shrinkage": {
            "l2_ratio": reconstruction["l2_norm_ratio"],
            "relative_reconstruction_bias": reconstruction["relative_reconstruction_bias"],
        },
        "sparsity": {"l0": sparsity["l0"], "l1": sparsity["l1"], "dead_latents": sparsity["dead_latents"]},
        "token_stats": {"tokens": full["tokens"]},
    }
    if downstream:
        metrics["model_behavior_preservation"] = {
            key: downstream[key] for key in ("kl_div_score", "kl_div_with_sae", "kl_div_with_ablation")
        }
        metrics["model_performance_preservation"] = {
            key: downstream[key]
            for key in ("ce_loss_score", "ce_loss_increase", "ce_loss_with_sae", "ce_loss_without_sae")
            + ("ce_loss_with_ablation",)
        }
    details = [
        {
            "source": name,
            "tokens": part["tokens"],
            "explained_variance": part["reconstruction"]["explained_variance"],
            "l0": part["sparsity"]["l0"],
            **{key: part["downstream"][key] for key in ("ce_loss_score", "kl_div_score") if "downstream" in part},
        }
        for name, part in full.get("sources", {}).items()
    ]
    return make_result("core", sae, config, metrics, details, full, time.perf_counter() - start)


def config_classes() -> dict[str, type]:
    """Eval name -> its config class (imported on use: some evals pull in heavy modules)."""
    from saelab.evals.absorption import AbsorptionConfig
    from saelab.evals.autointerp import AutoInterpConfig
    from saelab.evals.geometry import GeometryConfig
    from saelab.evals.probing import ProbingConfig
    from saelab.evals.replacement import ReplacementConfig

    return {
        "core": CoreConfig,
        "replacement": ReplacementConfig,
        "geometry": GeometryConfig,
        "absorption": AbsorptionConfig,
        "probing": ProbingConfig,
        "autointerp": AutoInterpConfig,
    }


def _run_one(eval_name: str, sae: SAE, model, config: Any, progress: bool, llm, data) -> dict[str, Any]:
    """One eval (not probing, which runs SAEs in groups) of one SAE."""
    check_measurable(eval_name, sae)
    if eval_name == "core":
        return run_core(sae, model, config, progress, data)
    if eval_name == "replacement":
        from saelab.evals.replacement import run_replacement

        return run_replacement(sae, model, config, progress, data)
    if eval_name == "geometry":
        from saelab.evals.geometry import run_geometry

        return run_geometry(sae, model, config, progress, data)
    if eval_name == "absorption":
        from saelab.evals.absorption import run_absorption

        return run_absorption(sae, model, config, progress)
    from saelab.evals.autointerp import run_autointerp

    return run_autointerp(sae, model, config, progress, llm=llm)


EVALS = ("core", "replacement", "geometry", "absorption", "probing", "autointerp")
"""Every eval of the suite, in the order `run_suite` runs them (cheap first)."""
ALL = tuple(name for name in EVALS if name != "replacement")
"""What `--suite all` runs: every eval of an SAE at one hook point (a cross-layer transcoder's is `replacement`)."""


def check_measurable(eval_name: str, sae: SAE) -> None:
    """Refuse an eval of one hook point for a cross-layer transcoder (ConfigError; the suite records it and goes
    on). The replacement eval refuses anything else itself."""
    if isinstance(sae, CrossLayerTranscoder) and eval_name != "replacement":
        raise ConfigError(
            f"the {eval_name} eval measures an SAE at one hook point: a cross-layer transcoder's eval is 'replacement'"
        )


HEADLINES: tuple[tuple[str, str, str, str], ...] = (
    ("core", "reconstruction_quality/explained_variance", "EV", ".3f"),
    ("core", "sparsity/l0", "L0", ".1f"),
    ("core", "model_performance_preservation/ce_loss_score", "CE score", ".3f"),
    ("core", "model_behavior_preservation/kl_div_score", "KL score", ".3f"),
    ("replacement", "model_performance_preservation/ce_loss_score", "repl. CE score", ".3f"),
    ("replacement", "model_performance_preservation/ce_loss_increase", "repl. CE incr.", "+.4f"),
    ("replacement", "model_behavior_preservation/kl_div_with_sae", "repl. KL", ".4f"),
    ("replacement", "reconstruction_quality/fvu", "FVU", ".3f"),
    ("replacement", "sparsity/l0", "L0 (layers)", ".1f"),
    ("geometry", "misc_metrics/frac_alive", "alive", ".3f"),
    ("geometry", "shrinkage/l2_ratio", "L2 ratio", ".3f"),
    ("geometry", "misc_metrics/average_max_decoder_cosine_sim", "max dec cos", ".3f"),
    ("absorption", "mean/mean_absorption_fraction_score", "absorption", ".3f"),
    ("absorption", "mean/mean_full_absorption_score", "full abs.", ".3f"),
    ("absorption", "mean/mean_num_split_features", "splits", ".2f"),
    ("probing", "llm/llm_test_accuracy", "LLM probe", ".3f"),
    ("probing", "sae/sae_top_1_test_accuracy", "top-1", ".3f"),
    ("probing", "sae/sae_top_5_test_accuracy", "top-5", ".3f"),
    ("autointerp", "autointerp/autointerp_score", "detection", ".3f"),
    ("autointerp", "fuzzing/accuracy", "fuzzing", ".3f"),
)
"""(eval, `category/metric`, column label, format): the numbers of the comparison table."""


def parse_suite(names: str | Sequence[str]) -> list[str]:
    """Eval names from "core,geometry" or a list, checked (an unknown one gets the closest name), in suite order;
    "all" means every eval of an SAE at one hook point (`ALL`)."""
    listed = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    listed = [n for n in listed if n]
    if "all" in listed:
        return list(ALL)
    for name in listed:
        if name not in EVALS:
            raise _unknown_eval(name)
    if not listed:
        raise ConfigError(f"no eval named; evals: {', '.join(EVALS)}")
    return [name for name in EVALS if name in listed]


def _unknown_eval(name: str) -> ConfigError:
    hint = closest(name, EVALS)
    return ConfigError(f"unknown eval '{name}'.{f' Did you mean {hint!r}?' if hint else ''} Evals: {', '.join(EVALS)}")


def suite_configs(evals: Sequence[str], configs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each eval's config: given (a config object, or a dict checked as `saelab train` checks its YAML), or the
    defaults. Built before any model is loaded, so a bad setting fails at once."""
    classes, configs = config_classes(), dict(configs or {})
    for name in configs:
        if name not in EVALS:
            raise _unknown_eval(name)
    built = {}
    for name in evals:
        given = configs.get(name)
        if given is None:
            built[name] = classes[name]()
        elif isinstance(given, Mapping):
            built[name] = from_dict(classes[name], given, name)
        else:
            built[name] = given
    return built


def run_suite(
    saes: Mapping[str, SAE],
    evals: str | Sequence[str] = ("core",),
    model=None,
    configs: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    llm=None,
    data: DataConfig | Mapping[str, DataConfig] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Run `evals` on every SAE of `saes` (name -> SAE): SAE name -> eval name -> result. `model` (one model, or
    SAE name -> model) serves the SAEs; default: each SAE's own, loaded once per model name. `data` (one, or per
    SAE name) is the text core and geometry read held-out contexts of; default: what each SAE was trained on. SAEs
    that read the same hook of one model share its pass in probing. An eval that cannot measure an SAE (absorption
    of a transcoder) gives `{"error": message}` and the suite goes on. `llm` replaces the explainer the autointerp
    config names. With `out`, each result is written there as its eval finishes, then the plots, table and page."""
    from saelab.splice import model_for

    if not saes:
        raise ConfigError("no SAE to evaluate")
    evals = parse_suite(evals)
    configs = suite_configs(evals, configs)
    models: dict[str | None, Any] = {}

    names = {id(sae): name for name, sae in saes.items()}

    def model_of(sae: SAE):
        if isinstance(model, Mapping):
            return model_for(sae, model.get(names[id(sae)]))
        if model is not None:
            return model_for(sae, model)
        if sae.cfg.model_name not in models:
            models[sae.cfg.model_name] = model_for(sae)
        return model_for(sae, models[sae.cfg.model_name])

    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in saes}
    for eval_name in evals:
        start = time.perf_counter()
        if eval_name == "probing":  # SAEs of one model and hook share its pass over the texts
            _run_probing(saes, configs[eval_name], model_of, progress, results)
        else:
            for name, sae in saes.items():
                try:
                    sae_data = data.get(name) if isinstance(data, Mapping) else data
                    config = configs[eval_name]
                    results[name][eval_name] = _run_one(eval_name, sae, model_of(sae), config, progress, llm, sae_data)
                except SaelabError as error:
                    results[name][eval_name] = {"eval_type_id": eval_name, "error": str(error)}
        if progress:
            print(f"{eval_name}: {len(saes)} SAE{'s' * (len(saes) > 1)} in {time.perf_counter() - start:.0f} s")
        if out is not None:  # each result as soon as it exists: a later eval that fails loses nothing
            for name, per_sae in results.items():
                write_result(per_sae[eval_name], Path(out) / name / f"{eval_name}.json")
    if out is not None:
        write_suite(results, out)
    return results


def _run_probing(
    saes: Mapping[str, SAE], config: Any, model_of: Callable[[SAE], Any], progress: bool, results: dict
) -> None:
    from saelab.evals.probing import run_probing_saes
    from saelab.splice import hooks_of

    groups: dict[tuple[int, str], dict[str, SAE]] = {}
    for name, sae in saes.items():
        try:
            check_measurable("probing", sae)
            key = (id(model_of(sae)), hooks_of(sae)[0])
        except SaelabError as error:
            results[name]["probing"] = {"eval_type_id": "probing", "error": str(error)}
            continue
        groups.setdefault(key, {})[name] = sae
    for group in groups.values():
        try:
            measured = run_probing_saes(group, model_of(next(iter(group.values()))), config, progress)
        except SaelabError as error:
            measured = {name: {"eval_type_id": "probing", "error": str(error)} for name in group}
        for name, result in measured.items():
            results[name]["probing"] = result


def headline(result: Mapping[str, Any], key: str) -> float | None:
    """The value of `category/metric` in a result, or None (an error, a metric not measured, NaN)."""
    category, metric = key.split("/")
    value = result.get("eval_result_metrics", {}).get(category, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def comparison_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table: one row per SAE, a column per headline number of the evals run."""
    ran = {e for per_sae in results.values() for e in per_sae}
    columns = [h for h in HEADLINES if h[0] in ran]
    header = ["SAE", *(label for _, _, label, _ in columns)]
    rows = []
    for name, per_sae in results.items():
        cells = [name]
        for eval_name, key, _, fmt in columns:
            result = per_sae.get(eval_name, {})
            value = headline(result, key)
            cells.append("error" if "error" in result else "-" if value is None else format(value, fmt))
        rows.append(cells)
    return header, rows


def comparison_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The comparison as a Markdown table (what `saelab eval --suite` prints)."""
    header, rows = comparison_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [line(header), " | ".join("-" * w for w in widths), *map(line, rows)]
    return "\n".join(f"| {line} |" for line in lines)


def write_suite(results: Mapping[str, Mapping[str, Mapping[str, Any]]], out: str | Path) -> list[Path]:
    """Write `<out>/<sae>/<eval>.json`, each eval's comparison plots, comparison.md, comparison.csv and index.html
    (atomically, file by file); returns the files written."""
    from saelab.evals.absorption import plot_absorption
    from saelab.evals.autointerp import plot_autointerp
    from saelab.evals.geometry import plot_geometry
    from saelab.evals.probing import plot_probing
    from saelab.evals.suite_page import write_suite_page

    out = Path(out)
    written = []
    for name, per_sae in results.items():
        for eval_name, result in per_sae.items():
            written.append(write_result(result, out / name / f"{eval_name}.json"))
    plots = {"geometry": plot_geometry, "absorption": plot_absorption, "probing": plot_probing}
    plots["autointerp"] = plot_autointerp
    for eval_name, plot in plots.items():
        measured = {n: dict(r[eval_name]) for n, r in results.items() if eval_name in r and "error" not in r[eval_name]}
        if measured:
            written += plot(measured, out)
    table = comparison_table(results)
    atomic_write_text(out / "comparison.md", table + "\n")
    header, rows = comparison_rows(results)
    atomic_write_text(out / "comparison.csv", "\n".join(",".join(row) for row in [header, *rows]) + "\n")
    written += [out / "comparison.md", out / "comparison.csv"]
    written.append(write_suite_page(results, out, (header, rows), [p for p in written if p.suffix == ".png"]))
    return written
