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

Every value must have the type of the field it fills (TOML/YAML booleans, integers, strings; a
number field takes an integer too), and `load_recipe` checks every job, and the local files each
one reads, before any job runs.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.spec import QuantSpec
from ..errors import QuantizeError, SpecError, UsageError
from .job import Job, parse_size


def _options_class(method: str) -> type:
    from ..algorithms.awq import AWQOptions
    from ..algorithms.gptq import GPTQOptions
    from ..algorithms.nf4 import NF4Options
    from ..algorithms.outlier import OutlierOptions
    from ..algorithms.rtn import RTNOptions

    return {"rtn": RTNOptions, "gptq": GPTQOptions, "awq": AWQOptions, "nf4": NF4Options,
            "outlier": OutlierOptions}[method]


METHODS = ("rtn", "gptq", "awq", "nf4", "outlier")
SPEC_KEYS = ("bits", "group_size", "sym", "act_order", "format", "keep_dense", "quant_type", "blocksize",
             "double_quant")
RUN_KEYS = ("device", "overwrite", "max_shard_size", "batch_size", "resume", "strict_vllm", "verify",
            "trust_remote_code", "max_memory")
BUDGET_KEYS = ("target_bpw", "target_size")   # per-module settings chosen for a size budget (run/budget.py)
JOB_KEYS = ("name", "model", "output", "method", *SPEC_KEYS, *RUN_KEYS, "options", "calibration", "overrides",
            "eval", "push_to_hub", *BUDGET_KEYS)
EVAL_KEYS = ("dataset", "windows", "seqlen")
OVERRIDE_KEYS = ("match", "bits", "group_size", "sym", "method", "keep_dense")
CALIBRATION_KEYS = ("dataset", "nsamples", "seqlen", "seed", "text_column", "generation_memory")
# The format each method writes unless the job says otherwise.
DEFAULT_FORMAT = {"nf4": "bnb", "outlier": "outlier"}


COMMAND_LINE = "command line"      # the `where` of jobs the subcommands build: their flags name themselves


def _within(where: str, exc: QuantizeError) -> QuantizeError:
    """`exc` with the job it concerns in front of its message (a command line's flags need no such name)."""
    if where == COMMAND_LINE:
        return exc
    return type(exc)(f"{where}: {exc.message}", exc.hint)


def _check_keys(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    if not isinstance(table, Mapping):
        raise SpecError(f"{where} must be a table of settings, not {_describe(table)}")
    for key in table:
        if key not in known:
            raise SpecError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(known)}")


# ---- value types: every key's type comes from the field it fills ----------------------------------

_PHRASES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    """A value as the recipe spelled it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'the string "{value if len(value) <= 60 else value[:57] + "..."}"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__} ({value})"


def _optional(annotation: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (annotation, False) otherwise."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _phrase(annotation: Any) -> str:
    inner, optional = _optional(annotation)
    if inner not in _PHRASES:
        raise TypeError(f"recipes have no value type for the annotation {annotation!r}")
    return _PHRASES[inner] + (" (or left out)" if optional else "")


def _typed(value: Any, annotation: Any, at: str) -> Any:
    """`value` checked against a field annotation: bool, int, float or str, or one of them | None.

    TOML and YAML booleans are booleans and integers integers: a bool is not an int, 4.0 is not an
    int and "4" is not a number. A number field takes an integer too, returned as a float."""
    inner, optional = _optional(annotation)
    phrase = _phrase(annotation)
    if value is None and optional:
        return None
    if inner is bool and isinstance(value, bool) or inner is str and isinstance(value, str):
        return value
    if not isinstance(value, bool) and (inner is int and isinstance(value, int)
                                        or inner is float and isinstance(value, (int, float))):
        try:
            return float(value) if inner is float else value
        except OverflowError:
            raise SpecError(f"{at} = {value} is out of range for a number") from None
    hint = None
    if isinstance(value, str) and inner is not str and _literal(value.strip(), inner):
        hint = f"write {value.strip().lower() if inner is bool else value.strip()} without quotes"
    elif inner is int and isinstance(value, float) and value.is_integer():
        hint = f"write {int(value)}"
    raise SpecError(f"{at} must be {phrase}, not {_describe(value)}", hint)


def _literal(text: str, kind: type) -> bool:
    """Whether `text` spells a value of `kind` (bool, int, float), as a quoted value often does."""
    if kind is bool:
        return text.lower() in ("true", "false")
    try:
        kind(text)
    except (TypeError, ValueError):
        return False
    return kind in (int, float)


def _typed_table(table: Mapping[str, Any], cls: type, where: str, field_of: Mapping[str, str] = {}) -> dict:
    """A table's values checked against the annotations of the dataclass `cls` they fill (keys
    already known; field_of maps a key to a field of another name)."""
    hints = typing.get_type_hints(cls)
    return {key: _typed(value, hints[field_of.get(key, key)], f"{where}.{key}") for key, value in table.items()}


def _job_key_types() -> dict[str, Any]:
    """The annotation each plain job key is checked against: the QuantSpec or Job field it fills."""
    spec, job = typing.get_type_hints(QuantSpec), typing.get_type_hints(Job)
    kinds = {key: spec["codebook" if key == "quant_type" else key] for key in SPEC_KEYS if key != "keep_dense"}
    kinds.update({key: job[key] for key in RUN_KEYS})
    kinds.update(name=str, model=str, method=str, push_to_hub=job["push_to_hub"], target_bpw=float, target_size=str)
    return kinds


def _patterns(value: Any, at: str) -> list[str]:
    """keep_dense: one regular expression or a list of them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{at} must be a string or a list of strings (regular expressions), not {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise SpecError(f"{at}[{i}] must be a string (a regular expression), not {_describe(item)}")
    return list(value)


def _typed_job(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A job (or the defaults) with every plain key's value checked and the nested tables' shapes
    checked (their contents are checked where they are used). A key set to null is left out."""
    kinds = _job_key_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        at = f"{where}.{key}"
        if value is None:
            continue
        if key in kinds:
            value = _typed(value, kinds[key], at)
        elif key == "output":
            if not isinstance(value, (str, os.PathLike)):
                raise SpecError(f"{at} must be a string (the folder to write), not {_describe(value)}")
        elif key == "keep_dense":
            value = _patterns(value, at)
        elif key in ("options", "calibration"):
            if not isinstance(value, Mapping):
                raise SpecError(f"{at} must be a table of settings, not {_describe(value)}")
        elif key == "overrides":
            if not isinstance(value, (list, tuple)) or not all(isinstance(e, Mapping) for e in value):
                what = _describe(value) if not isinstance(value, (list, tuple)) else \
                    "a list holding " + _describe(next(e for e in value if not isinstance(e, Mapping)))
                raise SpecError(f"{at} must be a list of tables (match = REGEX plus the settings), not {what}")
        elif key == "eval" and not isinstance(value, (str, Mapping)):
            raise SpecError(f"{at} must be a text file's path or a table (dataset, windows, seqlen), "
                            f"not {_describe(value)}")
        out[key] = value
    return out


def _override(entry: Mapping[str, Any], at: str) -> dict[str, Any]:
    """One overrides entry, its values checked against the QuantSpec fields they change."""
    _check_keys(entry, OVERRIDE_KEYS, at)
    spec = typing.get_type_hints(QuantSpec)
    kinds = {"match": str, "method": str, "keep_dense": bool, **{k: spec[k] for k in ("bits", "group_size", "sym")}}
    return {key: _typed(value, kinds[key], f"{at}.{key}") for key, value in entry.items()}


def _budget(data: Mapping[str, Any], method: str, where: str) -> Any:
    """The job's size budget (target_bpw or target_size), for the methods that allocate one."""
    from .budget import Budget

    if method not in ("rtn", "gptq", "awq"):
        raise _within(where, SpecError(f"--target-bpw/--target-size are not supported with {method}",
                                       "use rtn, gptq or awq"))
    try:
        size = data.get("target_size")
        return Budget(bpw=data.get("target_bpw"), size=parse_size(size) if size is not None else None)
    except (SpecError, UsageError) as exc:
        raise _within(where, SpecError(exc.message.replace("--max-shard-size", "--target-size"), exc.hint)) from None


def job_from_dict(data: Mapping[str, Any], where: str = "job", own_calibration: bool = True) -> Job:
    """A validated Job from one recipe entry (defaults already merged).

    Everything that can be checked without reading a file is checked here: each key's type, the
    spec, the options, the calibration and eval settings, the device list, the shard size, and
    whether the format can hold the spec; `check_inputs` checks the files a job reads.

    own_calibration: whether the calibration table is the job's own; one inherited from the
    recipe's defaults is ignored by a job that uses no data, an own one is an error there."""
    _check_keys(data, JOB_KEYS, where)
    data = _typed_job(data, where)
    for key in ("model", "output", "method"):
        if not data.get(key):
            raise SpecError(f"{where}: {key!r} is missing", "every job needs model, output and method")
    method = data["method"]
    if method not in METHODS:
        raise SpecError(f"{where}: method {method!r} is not known", f"choose one of {', '.join(METHODS)}")
    options_cls = _options_class(method)
    options_data = dict(data.get("options") or {})
    _check_keys(options_data, tuple(f.name for f in dataclasses.fields(options_cls)), f"{where}.options")
    options_data = _typed_table(options_data, options_cls, f"{where}.options")
    try:
        options = options_cls(**options_data)
    except SpecError as exc:
        raise _within(where, exc) from None
    spec_args: dict[str, Any] = {"method": method, "format": data.get("format", DEFAULT_FORMAT.get(method, "gptq"))}
    for key in ("bits", "group_size", "sym", "act_order", "blocksize", "double_quant"):
        if data.get(key) is not None:
            spec_args[key] = data[key]
    if getattr(options, "static_groups", False):
        if not spec_args.get("act_order"):
            raise _within(where, SpecError("static groups only change something together with act-order",
                                           "add act_order = true (--act-order), or drop static_groups"))
        # Columns are still quantized in activation order (the option says so); the groups stay the
        # original contiguous ones, so no non-trivial g_idx is stored: layouts without one hold it.
        spec_args["act_order"] = False
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
    keep_dense = list(data.get("keep_dense") or ())
    overrides = []
    for i, entry in enumerate(data.get("overrides") or ()):
        at = f"{where}.overrides[{i}]"
        entry = _override(entry, at)
        if not entry.get("match"):
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
    except SpecError as exc:
        raise _within(where, exc) from None
    calibration = None
    cal_data = dict(data.get("calibration") or {})
    _check_keys(cal_data, CALIBRATION_KEYS, f"{where}.calibration")
    needs_data = getattr(options, "needs_calibration", None)
    if needs_data is None:
        needs_data = method in ("gptq", "awq") or getattr(options, "rounding", "nearest") == "gptq"
    if needs_data:
        from ..calibration.data import CalibrationSpec

        cal_args = _typed_table(cal_data, CalibrationSpec, f"{where}.calibration", {"dataset": "source"})
        try:
            calibration = CalibrationSpec(source=cal_args.pop("dataset", "self"), **cal_args)
        except SpecError as exc:
            raise _within(where, exc) from None
    elif cal_data and own_calibration:
        raise SpecError(f"{where}: a calibration table was given, but {method} with these options uses no data",
                        "remove it, or choose options that use calibration data")
    run_args = {k: data[k] for k in RUN_KEYS if k in data}
    if "device" in run_args:
        from ..core.devices import parse_devices

        try:
            parse_devices(run_args["device"])
        except UsageError as exc:
            raise _within(where, exc) from None
    for key in ("max_shard_size", "max_memory"):
        if key in run_args:
            try:
                parse_size(run_args[key], "--" + key.replace("_", "-"))
            except UsageError as exc:
                raise _within(where, exc) from None
    if "batch_size" in run_args and run_args["batch_size"] < 1:
        raise _within(where, SpecError(f"--batch-size {run_args['batch_size']} must be at least 1",
                                       "it is the calibration sequences per forward pass; 8 is typical, "
                                       "fewer need less memory"))
    if "eval" in data:
        from .publish import EvalSpec

        ev = data["eval"]
        ev = {"dataset": ev} if isinstance(ev, str) else dict(ev)
        _check_keys(ev, EVAL_KEYS, f"{where}.eval")
        if "dataset" not in ev:
            raise SpecError(f"{where}.eval: 'dataset' (a text file) is missing")
        ev = _typed_table(ev, EvalSpec, f"{where}.eval")
        try:
            run_args["evaluation"] = EvalSpec(**ev)
        except UsageError as exc:
            raise _within(where, exc) from None
    if data.get("push_to_hub"):
        run_args["push_to_hub"] = data["push_to_hub"]
    if data.get("target_bpw") is not None or data.get("target_size") is not None:
        run_args["budget"] = _budget(data, method, where)
    from ..formats.gguf import parse_format
    from .plan import prepare

    try:
        if parse_format(spec.format) is not None:   # one GGUF file (run/gguf.py), not a planned checkpoint
            from .gguf import check_method

            check_method(spec, options)
        else:
            prepare(spec, options)       # the format holds the spec, the method produces its codes
    except SpecError as exc:
        raise _within(where, exc) from None
    output = Path(data["output"]).expanduser()
    return Job(name=data.get("name") or output.name, model=data["model"], output=output, spec=spec,
               options=options, calibration=calibration, source=dict(data), **run_args)


def _hub_id_form(model: str) -> bool:
    """Whether MODEL would be looked up on the hub when no such path exists (resolve_model's rule)."""
    from ..models.load import HUB_ID

    return not model.startswith((".", "/", "~")) and model.count(os.sep) <= 1 and bool(HUB_ID.fullmatch(model))


def check_inputs(job: Job, where: str) -> None:
    """The files a job reads, checked without reading the model: a model given as a local path
    is a folder with config.json; a calibration dataset that names a file exists. (The eval file
    is checked with the job.) Hub ids are left to the run, which may download them. The output
    may not destroy anything (the current folder, the model, a folder that is no checkpoint under
    overwrite); an existing output is left to the run (an array job's earlier outputs exist)."""
    from ..formats.checkpoint import check_output, local_folder
    from ..models.load import resolve_model

    try:
        check_output(job.output, overwrite=job.overwrite, protect=local_folder(job.model), allow_existing=True)
        if Path(job.model).expanduser().exists() or not _hub_id_form(job.model):
            resolve_model(job.model)
        if job.calibration is not None:
            _check_calibration_source(job.calibration.source)
    except QuantizeError as exc:
        raise _within(where, exc) from None


def _check_calibration_source(source: str) -> None:
    """What calibration.data reads `source` as, without reading it: self, hf:ID, an existing file
    of a known type, or an org/name[:config[:split]] that is no path and names no file."""
    from ..calibration.data import ACCEPTED, FILE_TYPES, HUB_ID

    if source == "self" or source.startswith("hf:"):
        return
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in FILE_TYPES:
            raise UsageError(f"calibration file {source} has an unknown extension {suffix or '(none)'!r}",
                             f"accepted: {', '.join(FILE_TYPES)}")
    elif path.exists():
        raise UsageError(f"calibration source {source} is not a file", f"pass {ACCEPTED}")
    elif suffix in FILE_TYPES or source.startswith((".", "/", "~")) or not HUB_ID.fullmatch(source):
        raise UsageError(f"calibration file not found: {source}", f"check the path; pass {ACCEPTED}")


def load_recipe(path: str | Path) -> list[Job]:
    """Every job of a TOML (.toml) or YAML (.yaml/.yml) recipe, validated before any runs: first
    each job's settings, then what each job reads (`check_inputs`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"recipe {path} is a folder", "pass the path of a .toml or .yaml recipe, e.g. configs/*.toml")
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist",
                         "pass the path of a .toml or .yaml recipe, e.g. configs/*.toml")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise UsageError(f"recipe {path} is neither .toml nor .yaml/.yml", "rename it with the right suffix")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"recipe {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})",
                        "save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"recipe {path} cannot be read: {exc.strerror or exc}", "check its permissions") from None
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:   # Python 3.10: the same parser, as the tomli package
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001  (tomllib / yaml parse errors)
        raise SpecError(f"recipe {path} does not parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"recipe {path} must hold a table with a 'jobs' list")
    _check_keys(data, ("defaults", "jobs"), str(path))
    defaults = data.get("defaults")
    defaults = {} if defaults is None else defaults
    _check_keys(defaults, JOB_KEYS, f"{path}: defaults")
    _typed_job(defaults, f"{path}: defaults")
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise SpecError(f"recipe {path} has no jobs", "add at least one [[jobs]] table")
    out = []
    for i, entry in enumerate(jobs):
        if not isinstance(entry, Mapping):
            raise SpecError(f"{path}: jobs[{i}] must be a table of settings, not {_describe(entry)}")
        merged = {**defaults, **entry}
        for table in ("options", "calibration"):
            if isinstance(defaults.get(table), Mapping) and isinstance(entry.get(table), Mapping):
                merged[table] = {**defaults[table], **entry[table]}
        out.append(job_from_dict(merged, f"{path}: jobs[{i}]", own_calibration=bool(entry.get("calibration"))))
    names = [j.output.resolve() for j in out]
    if len(set(names)) != len(names):
        raise SpecError(f"recipe {path}: two jobs write the same output folder", "give each job its own output")
    for i, job in enumerate(out):
        check_inputs(job, f"{path}: jobs[{i}]")
    return out
