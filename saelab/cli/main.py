"""The `saelab` command. Thin: it turns flags into a config and calls the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from saelab.cli.parser import build_parser, overrides, suggest_unknown
from saelab.cli.sae_source import load_sae_from_args, report_folder, sae_model_and_data
from saelab.core.config import ConfigError, deep_merge
from saelab.core.errors import SaelabError


def _run_config(args: argparse.Namespace, flag_names: list[str]):
    from saelab.runs.config import load_run_config, read_config_file

    data = read_config_file(args.config) if args.config else {}
    return load_run_config(deep_merge(data, overrides(args, flag_names)))


def run_pretokenize(args: argparse.Namespace, flag_names: list[str]) -> None:
    from saelab.runs.runner import pretokenize

    out = pretokenize(args.out, _run_config(args, flag_names), args.max_tokens)
    metadata = json.loads((out / "metadata.json").read_text())
    print(
        f"{metadata['n_contexts']} contexts of {metadata['context_size']} tokens in {len(metadata['shards'])} "
        f"shard(s) -> {out}/ (train on it with --data.dataset {out})"
    )


def run_cache_activations(args: argparse.Namespace, flag_names: list[str]) -> None:
    from saelab.runs.runner import cache_activations

    hooks = [h.strip() for h in args.hooks.split(",")] if args.hooks else None
    config = _run_config(args, flag_names)
    out = cache_activations(args.out, config, args.max_tokens, hooks, args.dtype, args.shard_rows)
    metadata = json.loads((out / "metadata.json").read_text())
    print(
        f"{metadata['rows']} activation rows of {metadata['hooks']} in {len(metadata['shards'])} shard(s) -> {out}/ "
        f"(train on it with --data.cache {out})"
    )


def run_train(args: argparse.Namespace, flag_names: list[str]) -> None:
    from saelab.evals.heldout import flat_by_source, worst_source
    from saelab.runs.runner import RUN_CONFIG_FILE, resume, train
    from saelab.training.trainer import WHOLE_MODEL

    if args.resume:
        if args.config or args.overwrite:
            raise ConfigError(
                f"--resume continues the run as configured in {Path(args.resume) / RUN_CONFIG_FILE}: "
                f"it cannot be combined with {'--config' if args.config else '--overwrite'}"
            )
        trained = resume(args.resume, **overrides(args, flag_names))
        out_dir = Path(args.resume)
    else:
        config = _run_config(args, flag_names)
        trained = train(config, overwrite=args.overwrite)
        out_dir = Path(config.out_dir or ".")
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    summary_file = out_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    rows = {name: row for name, row in summary.items() if name != WHOLE_MODEL}
    count = max(len(rows), len(trained))  # under module parallelism this rank trained only its share
    print(f"\nTrained {count} SAE(s); results in {out_dir}/ ({RUN_CONFIG_FILE}, metrics.jsonl, summary.json)")
    if rows:
        first = next(iter(rows.values()))
        print(f"  {first['tokens']:,} tokens in {first['steps']} steps, {first['tokens_per_second']:,.0f} tokens/s")
    width = max([10, *map(len, rows)])
    for name, row in rows.items():
        spliced = f"   CE increase {row['eval/ce_loss_increase']:+.4f}" if "eval/ce_loss_increase" in row else ""
        print(
            f"  {name:<{width}} {row['architecture']:<11} explained variance {row['explained_variance']:.3f}"
            f"   L0 {row['l0']:.1f}   dead latents {100 * row['dead_fraction']:.1f}%{spliced}   -> {out_dir / name}/"
        )
        sources = flat_by_source(row, "eval/")
        if (worst := worst_source(sources)) is not None and "eval/ce_loss_score" in row:
            print(
                f"  {'':<{width}} held out: explained variance {row['eval/explained_variance']:.3f}, CE-loss score "
                f"{row['eval/ce_loss_score']:.3f}; worst of {len(sources)} sources: {worst}, explained variance "
                f"{sources[worst]['explained_variance']:.3f}, CE-loss score {sources[worst]['ce_loss_score']:.3f} "
                f"(saelab eval {out_dir / name} for every source)"
            )
    whole = summary.get(WHOLE_MODEL, {})
    parts = [
        f"{label} {whole[key]:{fmt}}"
        for key, label, fmt in (
            ("kl", "KL", ".4f"),
            ("ce_loss_increase", "CE increase", "+.4f"),
            ("top1_agreement", "top-1 agreement", ".3f"),
            ("eval/kl_div_with_sae", "held-out KL", ".4f"),
            ("eval/ce_loss_increase", "held-out CE increase", "+.4f"),
        )
        if key in whole
    ]
    if parts:
        print(f"  model with every SAE spliced in (last window): {'   '.join(parts)}")


def run_eval(args: argparse.Namespace, flag_names: list[str]) -> None:
    if args.suite is not None or len(args.sae_dir) > 1:
        run_eval_suite(args, flag_names)
        return
    from saelab.data.builtin import is_builtin
    from saelab.evals.evaluate import evaluate, source_table, summary_rows, write_report

    args.sae_dir = args.sae_dir[0]
    sae, model, data = sae_model_and_data(args, overrides(args, flag_names))
    if args.n_contexts > data.heldout_contexts and not is_builtin(data.dataset):
        print(
            f"saelab: warning: --n_contexts {args.n_contexts}, but only the first {data.heldout_contexts} contexts "
            f"were held out of training: evaluating those",
            file=sys.stderr,
        )
    result = evaluate(
        sae,
        model,
        data,
        args.n_contexts,
        args.batch_contexts,
        error_term=not args.no_error_term,
        spliced=not args.no_spliced,
    )
    files = write_report(result, args.out or report_folder(args))
    width = max(len(name) for name, _ in summary_rows(result))
    for name, value in summary_rows(result):
        print(f"  {name:<{width}}  {value}")
    for line in source_table(result):
        print(f"  {line}")
    print(f"wrote {', '.join(str(f) for f in files)}")


def run_eval_suite(args: argparse.Namespace, flag_names: list[str]) -> None:
    from saelab.evals.suite import CoreConfig, comparison_table, parse_suite, run_suite, suite_configs

    evals = parse_suite(args.suite or "core")
    given = overrides(args, flag_names)
    core = CoreConfig(args.n_contexts, args.batch_contexts, not args.no_spliced, not args.no_error_term)
    ignored = [e for e in given if e not in ("model", "data", *evals)]
    if ignored:
        raise ConfigError(f"--{ignored[0]}.* settings given, but {ignored[0]} is not in --suite {','.join(evals)}")
    configs = suite_configs(evals, {"core": core, **{e: given[e] for e in evals if e in given}})
    sources = list(args.sae_dir)
    names = args.names.split(",") if args.names else [Path(s.rstrip("/")).name or s for s in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise ConfigError(f"--names needs one distinct name per SAE ({len(sources)}), got {names}")
    saes, models, data = {}, {}, {}
    opened: dict[str, Any] = {}
    for name, source in zip(names, sources, strict=True):
        args.sae_dir = source
        saes[name], models[name], data[name] = sae_model_and_data(args, given, opened)
    if args.out:
        out = Path(args.out)
    elif len(sources) == 1:
        out = report_folder(args) / "evals"
    else:
        out = Path("saelab-evals")
    results = run_suite(saes, evals, models, configs, out, progress=True, data=data)
    print(comparison_table(results))
    for name, per_sae in results.items():
        for eval_name, result in per_sae.items():
            if "error" in result:
                print(f"saelab: {eval_name} of {name}: {result['error']}", file=sys.stderr)
    print(f"wrote {out}/: results <SAE>/<eval>.json, comparison.md, comparison.csv, plots, index.html")


def run_dashboard(args: argparse.Namespace, flag_names: list[str]) -> None:
    from saelab.analysis import export_neuronpedia, feature_statistics, write_dashboard

    explanations = None
    if args.autointerp:  # read first: a wrong file fails before the long pass
        from saelab.evals.autointerp import explanations_of
        from saelab.evals.results import read_result

        explanations = explanations_of(read_result(args.autointerp))
    sae, model, data = sae_model_and_data(args, overrides(args, flag_names))
    stats = feature_statistics(
        sae,
        model,
        data,
        args.n_contexts,
        args.batch_contexts,
        args.top_k,
        (args.window_left, args.window_right),
        progress=True,
    )
    folder = report_folder(args)
    stats_file = folder / "feature_stats.safetensors"
    stats.save(stats_file)
    index = write_dashboard(
        stats, model.tokenizer, args.out or folder / "dashboard", chunk_size=args.chunk_size, explanations=explanations
    )
    never = int((stats.firing_counts == 0).sum())
    print(f"{stats.n_tokens:,} tokens, {stats.d_sae:,} latents ({never:,} never fired); statistics -> {stats_file}")
    print(f"dashboard -> {index} (open it in a browser; no server needed)")
    if args.neuronpedia:
        model_id = args.neuronpedia_model_id or str(sae.cfg.model_name or "model")
        sae_set = args.neuronpedia_sae_set or str(sae.cfg.hook_name)
        out = export_neuronpedia(stats, model.tokenizer, args.neuronpedia, model_id, sae_set, sae.cfg.hook_layer)
        print(f"Neuronpedia batch files -> {out}/")


def run_graph(args: argparse.Namespace, _flag_names: list[str]) -> None:
    from saelab.analysis.attribution import attribute
    from saelab.analysis.graph_files import graph_slug, write_graph_files
    from saelab.core.config import check_device
    from saelab.models.loading import load_model

    device = check_device(args.device or "cpu")
    clt = load_sae_from_args(args, args.sae_dir, device=device)
    if args.model and args.model_name and args.model != args.model_name:
        raise ConfigError(f"--model {args.model} and --model_name {args.model_name} disagree; give one of them")
    name = args.model or clt.cfg.model_name
    if name is None:
        raise ConfigError(f"{args.sae_dir} does not say which model it reads: give --model")
    model = load_model(name, dtype=args.dtype, device=device)
    clt = clt.to(next(model.model.parameters()).dtype)
    graph = attribute(
        model,
        clt,
        args.prompt,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        progress=True,
    )
    slug = args.slug or graph_slug(args.prompt)
    out = Path(args.out) if args.out else report_folder(args) / "graphs"
    page = write_graph_files(graph, out, slug, args.scan or name, args.node_threshold, args.edge_threshold)
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    replacement, completeness = graph.scores()
    top = ", ".join(
        f"{t!r} {float(p):.3f}" for t, p in zip(graph.logit_strings, graph.logit_probabilities, strict=True)
    )
    print(f"{len(graph.tokens)} tokens; next token: {top}")
    print(
        f"{graph.n_features} feature nodes of {graph.n_active_features} active latents; after pruning "
        f"{int(pruned.nodes.sum())} nodes, {int(pruned.edges.sum())} edges; replacement score {replacement:.3f}, "
        f"completeness {completeness:.3f}"
    )
    print(f"graph -> {out / (slug + '.json')} (circuit-tracer / Neuronpedia JSON); page -> {page}#{slug}")


def run_upload(args: argparse.Namespace, _flag_names: list[str]) -> None:
    from saelab.io.publish import push_to_hub, upload_sae_folder

    local = Path(args.sae_dir).expanduser()
    chosen = (args.subfolder, args.sae_id, args.model_name, args.hook_name, args.hook_layer)
    if local.exists() and all(option is None for option in chosen):
        url = upload_sae_folder(local, args.repo_id, args.path_in_repo, args.private, commit_message=args.message)
    else:  # from the hub, one SAE of a folder, or with new metadata: uploaded in the SAELens layout
        url = push_to_hub(
            load_sae_from_args(args, args.sae_dir),
            args.repo_id,
            args.path_in_repo,
            args.private,
            commit_message=args.message,
        )
    print(f"uploaded {args.sae_dir} -> {args.repo_id}{'/' + args.path_in_repo if args.path_in_repo else ''} ({url})")


def run_convert(args: argparse.Namespace, _flag_names: list[str]) -> None:
    from saelab.io import save_circuit_tracer, save_saelens_layers, save_sparsify
    from saelab.io.saelens_compat import to_saelens
    from saelab.io.saelens_format import load_sparsity
    from saelab.saes.clt import TranscoderSet
    from saelab.saes.files import save_sae

    sae = load_sae_from_args(args, args.source)
    if args.to == "sparsify":
        save_sparsify(sae, args.out)
        written = sae
    elif args.to == "circuit-tracer" or isinstance(sae, TranscoderSet):
        if args.to == "circuit-tracer":
            save_circuit_tracer(sae, args.out)
        else:  # SAELens has no class for a set: one SAELens transcoder per layer
            save_saelens_layers(sae, args.out)
        layers = getattr(sae.cfg, "layers", None)
        print(f"{sae.cfg.architecture} (layers {layers}) -> {args.out}/ ({args.to} layout)")
        return
    else:  # what SAELens loads: the SAE itself or its equivalent (BatchTopK -> JumpReLU, ...), or an error line
        written = to_saelens(sae)
        source = Path(args.source)  # a saelab/SAELens folder's sparsity.safetensors goes along
        save_sae(written, args.out, sparsity=load_sparsity(source) if source.is_dir() else None)
    kind = written.cfg.architecture + (" transcoder" if written.cfg.transcoder else " SAE")
    converted = f", from {sae.cfg.architecture}" if written is not sae else ""
    print(f"{kind} ({written.cfg.d_in} -> {written.cfg.d_sae} latents{converted}) -> {args.out}/ ({args.to} layout)")


def main(argv: list[str] | None = None) -> int:
    parser, subparsers, flag_names = build_parser()
    args, unknown = parser.parse_known_args(argv)
    names = flag_names[args.command]
    if unknown:
        message = suggest_unknown(unknown, subparsers[args.command].long_options, args.command)
        parser.exit(2, f"saelab: error: {message}\n")
    commands = {
        "train": run_train,
        "pretokenize": run_pretokenize,
        "cache-activations": run_cache_activations,
        "eval": run_eval,
        "dashboard": run_dashboard,
        "graph": run_graph,
        "upload": run_upload,
        "convert": run_convert,
    }
    try:
        commands[args.command](args, names)
    except (SaelabError, OSError) as e:  # what the user can fix; anything else is a bug: its traceback shows
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"saelab: error: {rank}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
