"""Model names: the bundled demo models ("mambart-demo", "mambart2-demo": shipped in the package,
no download), short names ("mamba-1.4b", "falcon-mamba-7b") and hub repositories ("state-spaces/mamba2-2.7b"),
found or downloaded through huggingface_hub, converted once into the mambart cache.

HF_HUB_OFFLINE=1 (or `local_files_only`) uses only what is in the Hugging Face cache
(HF_HUB_CACHE / HF_HOME, read when called). The tokenizer is the repository's tokenizer.json if
it has one, else EleutherAI/gpt-neox-20b's for state-spaces Mamba-1/2 checkpoints (the tokenizer
they were trained with), resolved the same way; Mamba-3 checkpoints (Llama-3 tokenizer) use only
their own.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import ModelLoadError

SHORT_NAMES: Dict[str, str] = {
    n: f"state-spaces/{n}" for n in (
        "mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b",
        "mamba-2.8b-slimpj", "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b",
        "mamba2-2.7b", "mamba2attn-2.7b",
        "mamba3-siso-187m", "mamba3-siso-1.5b", "mamba3-mimo-187m", "mamba3-mimo-1.5b",
        "mamba-130m-hf", "mamba-370m-hf", "mamba-790m-hf", "mamba-1.4b-hf", "mamba-2.8b-hf")
}
# Flavours and hybrids from other publishers (transformers layouts: FalconMambaForCausalLM,
# Mamba2ForCausalLM, NemotronHForCausalLM, GraniteMoeHybridForCausalLM, BambaForCausalLM,
# JambaForCausalLM, Zamba2ForCausalLM).
SHORT_NAMES.update({
    "falcon-mamba-7b": "tiiuae/falcon-mamba-7b",
    "falcon-mamba-7b-instruct": "tiiuae/falcon-mamba-7b-instruct",
    "mamba-codestral-7b": "mistralai/Mamba-Codestral-7B-v0.1",
    # NemotronHForCausalLM (Mamba-2, attention and MLP blocks); repository name as quoted by the
    # spec's third-party sources, not checked against the hub from here.
    "nemotron-h-8b": "nvidia/Nemotron-H-8B-Base-8K",
    # GraniteMoeHybridForCausalLM (Mamba-2 and attention layers, each with the shared MLP, tiny
    # and small with MoE); repository names as public pages quote them, not checked against the
    # hub from here.
    "granite-4.0-h-micro": "ibm-granite/granite-4.0-h-micro",
    "granite-4.0-h-tiny": "ibm-granite/granite-4.0-h-tiny",
    "granite-4.0-h-small": "ibm-granite/granite-4.0-h-small",
    # BambaForCausalLM (Mamba-2 with three attention layers); repository name as public pages
    # quote it (formerly ibm-fms/Bamba-9B), not checked against the hub from here.
    "bamba-9b": "ibm-ai-platform/Bamba-9B",
    # JambaForCausalLM (Mamba-1 and attention layers, MoE every other layer; 52B total);
    # repository name as public pages quote it, not checked against the hub from here.
    "jamba-v0.1": "ai21labs/Jamba-v0.1",
    # Zamba2ForCausalLM (Mamba-2 and shared attention blocks with LoRA adapters); repository
    # names as stored hub pages show them; their config.json files not read from here, so the
    # conversion of the real checkpoints is unverified.
    "zamba2-1.2b": "Zyphra/Zamba2-1.2B",
    "zamba2-2.7b": "Zyphra/Zamba2-2.7B",
    "zamba2-7b": "Zyphra/Zamba2-7B",
})
NEOX_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"

# Models shipped inside the package (tools/train_demo.py; each directory has a model card).
BUNDLED_DIR = Path(__file__).resolve().parent / "models"
BUNDLED = ("mambart-demo", "mambart2-demo")


def bundled_model_dir(name: str) -> Optional[Path]:
    """The packaged model directory for a bundled name ("mambart-demo"), else None."""
    if name in BUNDLED and (BUNDLED_DIR / name / "config.json").is_file():
        return BUNDLED_DIR / name
    return None

_SMALL_FILES = ["config.json", "tokenizer.json", "*.index.json", "tokenizer_config.json",
                "tokenizer.model"]


def _truthy(v: Optional[str]) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The huggingface_hub cache, read from the environment now (the library reads it once at
    import, which would ignore a later change)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_repo_id(name: str) -> str:
    """Short name -> its repository (SHORT_NAMES); 'owner/repo' passes through."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return name
    raise ModelLoadError(
        f"unknown model {name!r}: not an existing directory, not a bundled model "
        f"({', '.join(BUNDLED)}), not a known short name ({', '.join(sorted(SHORT_NAMES))}) "
        f"and not a hub repository 'owner/name'")


def _pick_weights(files: List[str]) -> List[str]:
    names = set(files)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in names:
            ext = ".safetensors" if single.endswith(".safetensors") else ".bin"
            return [index] + [f for f in files if f.endswith(ext) and "/" not in f]
        if single in names:
            return [single]
    return []


def snapshot(repo_id: str, revision: Optional[str] = None) -> str:
    """The local snapshot directory of `repo_id` at `revision` (config, weights, tokenizer),
    downloading what is missing unless offline."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    offline = hub_offline()
    online_error = None
    if not offline:
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo_id, revision=revision)
            files = [s.rfilename for s in (info.siblings or [])]
            weights = _pick_weights(files)
            if not weights:
                raise ModelLoadError(f"{repo_id}: the repository has no model.safetensors or "
                                     f"pytorch_model.bin (files: {sorted(files)})")
            # revision (not info.sha) so that refs/<branch> is recorded for later offline use
            return snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                     allow_patterns=_SMALL_FILES + weights)
        except ModelLoadError:
            raise
        except Exception as e:  # network down, repo not found, ...: try the cache
            online_error = e
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                 local_files_only=True)
    except Exception as e:
        why = f"HF_HUB_OFFLINE is set and it is not in the cache ({cache})" if offline else \
            f"download failed ({type(online_error).__name__}: {online_error}) and it is not in " \
            f"the cache ({cache})"
        rev = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(f"{repo_id}{rev}: cannot load: {why}") from e


def _neox_tokenizer() -> Optional[str]:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(NEOX_TOKENIZER_REPO, "tokenizer.json", cache_dir=hub_cache_dir(),
                               local_files_only=hub_offline())
    except Exception as e:
        warnings.warn(f"the tokenizer {NEOX_TOKENIZER_REPO} could not be found or downloaded "
                      f"({type(e).__name__}); the model will take and give token ids only",
                      stacklevel=3)
        return None


def load_model_dir(name: str, revision: Optional[str] = None,
                   dtype: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Resolves a bundled or hub name to a mambart model directory (hub models: converted into
    the cache).

    Returns (model_dir, tokenizer.json path or None)."""
    bundled = bundled_model_dir(name)
    if bundled is not None:
        t = bundled / "tokenizer.json"
        return str(bundled), (str(t) if t.is_file() else None)
    snap, tok, repo_id = source_dir(name, revision)
    from ._cache import ensure_converted

    try:
        out = ensure_converted(snap, dtype=dtype, tokenizer=tok, name=repo_id.replace("/", "--"),
                               source_info={"repo": repo_id, "revision": snap.name,
                                            "requested_revision": revision})
    finally:
        release_tokenizer(tok)
    t = Path(out) / "tokenizer.json"
    return out, (str(t) if t.is_file() else None)


def release_tokenizer(tok: Optional[str]) -> None:
    """Removes a temporary tokenizer made by source_dir (a converted tiktoken file)."""
    if tok is not None and Path(tok).parent.name.startswith("mambart-tok-"):
        import shutil

        shutil.rmtree(Path(tok).parent, ignore_errors=True)


def source_dir(name: str, revision: Optional[str] = None) -> Tuple[Path, Optional[str], str]:
    """A hub name's checkpoint snapshot (downloaded unless cached or offline) and its
    tokenizer.json (the repository's, GPT-NeoX's for state-spaces Mamba-1/2, or a converted
    tiktoken file: pass it to release_tokenizer when done). Returns (snapshot, tokenizer,
    repo_id)."""
    repo_id = resolve_repo_id(name)
    snap = Path(snapshot(repo_id, revision))
    tok: Optional[str] = None
    if (snap / "tokenizer.json").is_file():
        tok = str(snap / "tokenizer.json")
    else:
        from .convert import load_json

        cfg = load_json(snap / "config.json") if (snap / "config.json").is_file() else {}
        ssm = cfg.get("ssm_cfg") if isinstance(cfg.get("ssm_cfg"), dict) else {}
        if "model_type" not in cfg and "d_model" in cfg:  # a state-spaces checkpoint
            if ssm.get("layer") == "Mamba3":
                # Trained with a Llama-3 tokenizer, not GPT-NeoX's: never substitute another.
                # A tiktoken-style tokenizer.model is converted (mambart._tiktoken).
                import tempfile

                from ._tiktoken import convert_tiktoken_dir

                tmp = Path(tempfile.mkdtemp(prefix="mambart-tok-"))
                conv = convert_tiktoken_dir(snap, tmp / "tokenizer.json")
                if conv is not None:
                    tok = str(conv)
                else:
                    warnings.warn(f"{repo_id} has neither tokenizer.json nor a tiktoken "
                                  f"tokenizer.model (a Mamba-3 checkpoint uses a Llama-3 "
                                  f"tokenizer): the model takes and gives token ids only",
                                  stacklevel=2)
            else:
                tok = _neox_tokenizer()
    return snap, tok, repo_id
