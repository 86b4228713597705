r"""Recipes: quantization jobs described in TOML or YAML, and the Job every command runs.

A recipe holds optional `defaults` and a list `jobs`; each job is a flat table of the keys below
(the same names as the command-line flags, with underscores), an `options` table for the method's
own knobs and a `calibration` table. Every key is checked: an unknown one is an error naming it.

    [defaults]
    device = "auto"

    [[jobs]]
    name = "llama3-8b-w4g128"
    model = "meta-llama/Meta-Llama-3-8B"
    output = "out/llama3-8b-gptq-w4g128"
    method = "gptq"
    bits = 4
    group_size = 128
    sym = true
    [jobs.options]
    damp = 0.01
    [jobs.calibration]
    dataset = "c4.parquet"
    nsamples = 128
    [[jobs.overrides]]            # per-module settings by regex over full module names, first match wins
    match = 'mlp\.down_proj'
    bits = 8

The command-line subcommands build the same dictionary and go through `job_from_dict`, so a
command and its one-job recipe are one code path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import SpecError, UsageError
from .spec import QuantSpec


@dataclass(frozen=True)
class Job:
    """One quantization run: what `quantize()` needs, validated."""

    name: str
    model: str
    output: Path
    spec: QuantSpec
    options: Any = None
    calibration: Any = None          # CalibrationSpec, or None for methods that need no data
    device: str = "auto"
    overwrite: bool = False
    max_shard_size: str = "2GB"
    batch_size: int = 8
    resume: bool = True
    strict_vllm: bool = False        # vLLM preflight findings are errors, not warnings
    verify: bool = True              # read the written checkpoint back and check it before the rename
    evaluation: Any = None           # publish.EvalSpec: measure the written checkpoint into its card
    push_to_hub: str | None = None   # hub repository to upload to
    source: dict = field(default_factory=dict)   # the job's keys as given (for the model card)


def _options_class(method: str) -> type:
    from .algorithms.awq import AWQOptions
    from .algorithms.gptq import GPTQOptions
    from .algorithms.nf4 import NF4Options
    from .algorithms.outlier import OutlierOptions
    from .algorithms.rtn import RTNOptions

    return {"rtn": RTNOptions, "gptq": GPTQOptions, "awq": AWQOptions, "nf4": NF4Options,
            "outlier": OutlierOptions}[method]


METHODS = ("rtn", "gptq", "awq", "nf4", "outlier")
SPEC_KEYS = ("bits", "group_size", "sym", "act_order", "format", "keep_dense", "quant_type", "blocksize",
             "double_quant")
RUN_KEYS = ("device", "overwrite", "max_shard_size", "batch_size", "resume", "strict_vllm", "verify")
JOB_KEYS = ("name", "model", "output", "method", *SPEC_KEYS, *RUN_KEYS, "options", "calibration", "overrides",
            "eval", "push_to_hub")
EVAL_KEYS = ("dataset", "windows", "seqlen")
OVERRIDE_KEYS = ("match", "bits", "group_size", "sym", "method", "keep_dense")
CALIBRATION_KEYS = ("dataset", "nsamples", "seqlen", "seed", "text_column")
# The format each method writes unless the job says otherwise.
DEFAULT_FORMAT = {"nf4": "bnb", "outlier": "outlier"}


def _check_keys(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    if not isinstance(table, Mapping):
        raise SpecError(f"{where} must be a table of settings, not {type(table).__name__}")
    for key in table:
        if key not in known:
            raise SpecError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(known)}")


def job_from_dict(data: Mapping[str, Any], where: str = "job", own_calibration: bool = True) -> Job:
    """A validated Job from one recipe entry (defaults already merged).

    own_calibration: whether the calibration table is the job's own; one inherited from the
    recipe's defaults is ignored by a job that uses no data, an own one is an error there."""
    _check_keys(data, JOB_KEYS, where)
    for key in ("model", "output", "method"):
        if not data.get(key):
            raise SpecError(f"{where}: {key!r} is missing", "every job needs model, output and method")
    method = data["method"]
    if method not in METHODS:
        raise SpecError(f"{where}: method {method!r} is not known", f"choose one of {', '.join(METHODS)}")
    options_cls = _options_class(method)
    options_data = dict(data.get("options") or {})
    _check_keys(options_data, tuple(f.name for f in dataclasses.fields(options_cls)), f"{where}.options")
    try:
        options = options_cls(**options_data)
    except TypeError as exc:
        raise SpecError(f"{where}.options: {exc}") from None
    spec_args: dict[str, Any] = {"method": method, "format": data.get("format", DEFAULT_FORMAT.get(method, "gptq"))}
    for key in ("bits", "group_size", "sym", "act_order", "blocksize", "double_quant"):
        if data.get(key) is not None:
            spec_args[key] = data[key]
    # Method defaults where they differ from QuantSpec's: AWQ and the outlier split are asymmetric;
    # the outlier split's channel mode at 8 bits is LLM.int8()'s per-row symmetric absmax.
    int8_rows = method == "outlier" and getattr(options, "mode", "") == "channel" and spec_args.get("bits", 4) == 8
    if method in ("awq", "outlier"):
        spec_args.setdefault("sym", int8_rows)
    if int8_rows:
        spec_args.setdefault("group_size", -1)
    if "quant_type" in data:
        spec_args["codebook"] = data["quant_type"]
    elif method == "nf4":
        spec_args["codebook"] = "nf4"
    keep_dense = data.get("keep_dense") or ()
    keep_dense = list([keep_dense] if isinstance(keep_dense, str) else keep_dense)
    overrides = []
    for i, entry in enumerate(data.get("overrides") or ()):
        at = f"{where}.overrides[{i}]"
        _check_keys(entry, OVERRIDE_KEYS, at)
        if not isinstance(entry.get("match"), str) or not entry["match"]:
            raise SpecError(f"{at}: 'match' (a regular expression over module names) is missing")
        if entry.get("keep_dense"):
            if len(entry) > 2:
                raise SpecError(f"{at}: keep_dense = true leaves the modules unquantized; it takes no other setting")
            keep_dense.append(entry["match"])
            continue
        overrides.append((entry["match"], {k: v for k, v in entry.items() if k not in ("match", "keep_dense")}))
    spec_args["keep_dense"] = tuple(keep_dense)
    spec_args["overrides"] = tuple(overrides)
    try:
        spec = QuantSpec(**spec_args)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None
    calibration = None
    cal_data = dict(data.get("calibration") or {})
    _check_keys(cal_data, CALIBRATION_KEYS, f"{where}.calibration")
    needs_data = getattr(options, "needs_calibration", None)
    if needs_data is None:
        needs_data = method in ("gptq", "awq") or getattr(options, "rounding", "nearest") == "gptq"
    if needs_data:
        from .calibration.data import CalibrationSpec

        cal_args = {k: v for k, v in cal_data.items() if k != "dataset"}
        calibration = CalibrationSpec(source=str(cal_data.get("dataset", "self")), **cal_args)
    elif cal_data and own_calibration:
        raise SpecError(f"{where}: a calibration table was given, but {method} with these options uses no data",
                        "remove it, or choose options that use calibration data")
    run_args = {k: data[k] for k in RUN_KEYS if k in data}
    if "device" in run_args:
        from .errors import UsageError
        from .pipeline import parse_devices

        try:
            parse_devices(run_args["device"])
        except UsageError as exc:
            raise SpecError(f"{where}: {exc.message}", exc.hint) from None
    if data.get("eval"):
        from .publish import EvalSpec

        ev = data["eval"]
        ev = {"dataset": ev} if isinstance(ev, str) else dict(ev)
        _check_keys(ev, EVAL_KEYS, f"{where}.eval")
        if "dataset" not in ev:
            raise SpecError(f"{where}.eval: 'dataset' (a text file) is missing")
        run_args["evaluation"] = EvalSpec(dataset=str(ev["dataset"]), **{k: int(v) for k, v in ev.items() if k != "dataset"})
    if data.get("push_to_hub"):
        run_args["push_to_hub"] = str(data["push_to_hub"])
    if "batch_size" in run_args and (not isinstance(run_args["batch_size"], int) or run_args["batch_size"] < 1):
        raise SpecError(f"{where}: batch_size must be a positive integer")
    output = Path(str(data["output"])).expanduser()
    return Job(name=str(data.get("name") or output.name), model=str(data["model"]), output=output, spec=spec,
               options=options, calibration=calibration, source=dict(data), **run_args)


def load_recipe(path: str | Path) -> list[Job]:
    """Every job of a TOML (.toml) or YAML (.yaml/.yml) recipe, validated before any runs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist", "pass the path of a .toml or .yaml recipe, e.g. configs/*.toml")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise UsageError(f"recipe {path} is neither .toml nor .yaml/.yml", "rename it with the right suffix")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001  (tomllib / yaml parse errors)
        raise SpecError(f"recipe {path} does not parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"recipe {path} must hold a table with a 'jobs' list")
    _check_keys(data, ("defaults", "jobs"), str(path))
    defaults = data.get("defaults") or {}
    _check_keys(defaults, JOB_KEYS, f"{path}: defaults")
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise SpecError(f"recipe {path} has no jobs", "add at least one [[jobs]] table")
    out = []
    for i, entry in enumerate(jobs):
        if not isinstance(entry, Mapping):
            raise SpecError(f"{path}: jobs[{i}] must be a table of settings")
        merged = {**defaults, **entry}
        for table in ("options", "calibration"):
            if isinstance(defaults.get(table), Mapping) and isinstance(entry.get(table), Mapping):
                merged[table] = {**defaults[table], **entry[table]}
        out.append(job_from_dict(merged, f"{path}: jobs[{i}]", own_calibration=bool(entry.get("calibration"))))
    names = [j.output.resolve() for j in out]
    if len(set(names)) != len(names):
        raise SpecError(f"recipe {path}: two jobs write the same output folder", "give each job its own output")
    return out
