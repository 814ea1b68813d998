"""The FP student opened with transformers: the reference every artifact is measured against."""

from __future__ import annotations

from pathlib import Path


class HFRuntime:
    """Greedy decoding of an HF checkpoint on CPU (float32), one prompt at a time like the others."""

    device = "cpu"

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self._set_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())

    def _set_model(self, model) -> None:
        self.model = model
        eos = self.model.generation_config.eos_token_id
        self.eos = eos if isinstance(eos, int) else (eos[0] if eos else None)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False) -> list[int]:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else 0,
                do_sample=False,
                pad_token_id=self.eos,
            )
        return out[0, len(prompt_ids) :].tolist()

    def close(self) -> None:
        self.model = None
