"""Resolve MODEL (local folder | hub id | hub cache entry), read safetensors lazily, build skeletons.

STUB: the API below is the contract; implementation in progress.

    resolve_model(model: str, revision: str | None = None) -> Path
        A local folder is used as is (must exist, must hold config.json). Otherwise MODEL must look
        like a hub id ("org/name"); it is resolved with huggingface_hub.snapshot_download (only
        config/tokenizer/safetensors/index files), online, or from the local cache when offline
        (HF_HUB_OFFLINE=1 or no network). Neither: ModelError one line saying so.

    class SafetensorsFile(path: Path)
        Parses and validates the header (FORMATS.md §5.2 rules 1-7) on construction; raises
        CheckpointError naming the file and the problem ("truncated", "header larger than the file", ...).
        .names() -> list[str]; .dtype(name) -> torch.dtype; .shape(name) -> tuple[int, ...];
        .nbytes(name) -> int; .read(name) -> Tensor (CPU, read with positioned reads, no mmap);
        .metadata -> dict[str, str]; .close(); context manager.

    class CheckpointReader(folder: Path)
        The whole checkpoint: config.json (.config: dict), single model.safetensors or an index
        (model.safetensors.index.json validated per §5.2 rules 8-11: size, weight_map, relative
        .safetensors names inside the folder, shards exist, keys actually present). A folder with only
        pickle weights (*.bin, *.pt, *.pth) is refused with a hint to convert to safetensors.
        .names() -> list[str] (every tensor, sorted as in the files);
        .dtype(name), .shape(name), .nbytes(name);
        .read(name, check_finite: bool = False) -> Tensor   (NaN/Inf -> CheckpointError naming it);
        .total_bytes -> int (sum of tensor storage sizes); .files -> list[Path] (the shards);
        .close(); context manager.

    build_skeleton(folder: Path, config: dict | None = None) -> nn.Module
        AutoModelForCausalLM built from the folder's config with parameters on the meta device
        (accelerate.init_empty_weights; buffers such as rotary inv_freq stay real), trust_remote_code
        off, any quantization_config ignored.
"""
