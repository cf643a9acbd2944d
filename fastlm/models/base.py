"""What the three language models share: their output, input checks, the loss head, save/load and accounting."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from fastlm.files import respect_umask
from fastlm.kernels import linear_cross_entropy
from fastlm.kernels.utils import debug_checks_enabled

from .config import ModelConfig
from .weights import load_weights

IGNORE_INDEX = -100   # labels that have no target (padding, unmasked MLM positions)
INDEX_DTYPES = (torch.int64, torch.int32)   # what ids, lengths and labels may be


@dataclass
class ModelOutput:
    loss: Tensor | None = None        # mean cross-entropy over the non-ignored targets (0 when there are none),
                                      # label-smoothed if the forward was given label_smoothing
    accuracy: Tensor | None = None    # fraction of those targets predicted exactly (argmax), on device
    n_targets: Tensor | None = None   # how many targets the loss averages over
    logits: Tensor | None = None      # (B, T, vocab_size), only with return_logits=True


# A value check: a scalar statistic (computed on device) and what to say when its value is wrong (None = fine).
ValueCheck = tuple[Tensor, Callable[[int], "str | None"]]


def value_checks_wanted(tensor: Tensor) -> bool:
    """Whether to check the values inside the inputs: reading them on the host costs a device sync every forward
    and breaks a torch.compile graph, so (as in the kernels) only for CPU tensors in eager mode, where it is free,
    or anywhere with FASTLM_DEBUG=1. Shapes, dtypes and devices are always checked: that needs no sync."""
    return debug_checks_enabled() or (tensor.device.type == "cpu" and not torch.compiler.is_compiling())


def check_index_tensor(name: str, tensor: object, reference_name: str, reference: Tensor) -> None:
    """Raise a ValueError naming `name` unless it is an int64/int32 tensor on the device of `reference`."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} of type {type(tensor).__name__}: expected a torch.Tensor")
    # The embedding lookup takes int32/int64 only; bool or uint8 ids would fail deep inside it.
    if tensor.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} of dtype {tensor.dtype}: expected torch.int64 or torch.int32")
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device}: expected the device of {reference_name}, {reference.device}")


def token_checks(
    config: ModelConfig,
    ids: Tensor,
    lengths: Tensor | None,
    labels: Tensor | None,
    *,
    names: tuple[str, str, str] = ("input_ids", "lengths", "labels"),
) -> list[ValueCheck]:
    """Check shapes now (raising ValueError) and return the value checks, to be run for all inputs with one sync
    (none where value_checks_wanted says no)."""
    ids_name, lengths_name, labels_name = names
    given = [(ids_name, ids)] + [(name, tensor) for name, tensor in ((lengths_name, lengths), (labels_name, labels))
                                 if tensor is not None]
    for name, tensor in given:
        check_index_tensor(name, tensor, ids_name, ids)
    if ids.dim() != 2 or 0 in ids.shape:
        raise ValueError(f"{ids_name} of shape {tuple(ids.shape)}: expected ids [B, T] with B >= 1 and T >= 1")
    batch, length = ids.shape
    if length > config.max_seq_len:
        raise ValueError(f"{ids_name} has {length} tokens per row: expected at most max_seq_len = {config.max_seq_len}")
    if lengths is not None and tuple(lengths.shape) != (batch,):
        raise ValueError(f"{lengths_name} of shape {tuple(lengths.shape)}: expected ({batch},), one length per "
                         f"row of {ids_name}")
    if labels is not None and labels.shape != ids.shape:
        raise ValueError(f"{labels_name} of shape {tuple(labels.shape)}: expected the shape of {ids_name}, "
                         f"{tuple(ids.shape)}")
    if not value_checks_wanted(ids):
        return []
    vocab = config.vocab_size
    checks: list[ValueCheck] = [
        (ids.min(), lambda low: f"{ids_name} contains {low}: expected ids >= 0" if low < 0 else None),
        (ids.max(), lambda high: f"{ids_name} contains {high}: expected ids < vocab_size = {vocab}"
         if high >= vocab else None),
    ]
    if lengths is not None:
        checks += [
            (lengths.min(), lambda low: f"{lengths_name} contains {low}: expected lengths >= 1" if low < 1 else None),
            (lengths.max(), lambda high: f"{lengths_name} contains {high}: expected lengths <= {length} "
             f"(the tokens per row of {ids_name})" if high > length else None),
        ]
    if labels is not None:
        checks += [
            (labels.max(), lambda high: f"{labels_name} contains {high}: expected labels < vocab_size = {vocab}"
             if high >= vocab else None),
            (((labels < 0) & (labels != IGNORE_INDEX)).sum(), lambda bad: f"{labels_name} has {bad} negative "
             f"values other than {IGNORE_INDEX}: expected labels in [0, {vocab}) or {IGNORE_INDEX}" if bad else None),
        ]
    return checks


def run_checks(checks: list[ValueCheck]) -> None:
    """Bring every statistic to the host in one transfer (one sync) and raise the first failure."""
    if not checks:
        return
    values = torch.stack([statistic.to(torch.int64) for statistic, _ in checks]).tolist()
    for value, (_, complaint) in zip(values, checks):
        message = complaint(value)
        if message:
            raise ValueError(message)


def ignore_padding(labels: Tensor, lengths: Tensor | None) -> Tensor:
    """labels (B, T) with every position at or beyond its row's length set to -100."""
    if lengths is None:
        return labels
    padding = torch.arange(labels.shape[1], device=labels.device)[None, :] >= lengths[:, None]
    return labels.masked_fill(padding, IGNORE_INDEX)


def lm_output(hidden: Tensor, head: nn.Linear, targets: Tensor | None, return_logits: bool,
              label_smoothing: float = 0.0) -> ModelOutput:
    """(B, T, D) hidden states through the output `head` into loss/accuracy against (B, T) targets (-100 = none),
    the loss with F.cross_entropy's `label_smoothing`.

    The loss goes through linear_cross_entropy, which never materialises the (B*T, vocab) logits."""
    output = ModelOutput()
    if targets is not None:
        flat_targets = targets.reshape(-1)
        weight, bias, flat_hidden = head.weight, head.bias, hidden.reshape(-1, hidden.shape[-1])
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast does not reach inside the kernel (and the final LayerNorm hands it fp32): cast here so the
            # logits matmul runs in the autocast dtype, as nn.Linear would.
            dtype = torch.get_autocast_dtype(device_type)
            flat_hidden, weight = flat_hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        loss, correct = linear_cross_entropy(flat_hidden, weight, flat_targets, bias=bias,
                                             ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                             return_accuracy=True)
        output.n_targets = (flat_targets != IGNORE_INDEX).sum()
        output.loss = loss
        output.accuracy = correct / output.n_targets.clamp_min(1)
    if return_logits:
        output.logits = head(hidden)
    return output


class LanguageModel(nn.Module):
    """Save/load, parameter counting, optimizer set-up and FLOP estimates shared by the models."""

    config: ModelConfig   # models of one stack; Seq2SeqLM overrides the three methods below

    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this model's modules (saved as config.json)."""
        return {"config": self.config.to_dict()}

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> LanguageModel:
        return cls(ModelConfig.from_dict(values["config"]))

    def attention_spans(self, length: float) -> list[tuple[int, int, float]]:
        """(n_layers, d_model, keys attended per token) of each attention kind at `length` tokens per sequence, for
        estimate_flops_per_token."""
        return [(self.config.n_layers, self.config.d_model, length)]

    def save(self, directory: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write config.json and model.safetensors (a tied tensor is stored once and re-tied by the model on load).
        `metadata` (facts about the model's inputs, e.g. {"tokenizer_sha256": ...}) goes into config.json's
        "metadata"; `load` ignores it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": type(self).__name__, **self.config_dict(), "metadata": metadata or {}}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_model(self, str(directory / "model.safetensors"))
        respect_umask(directory / "model.safetensors")

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device | None = None) -> LanguageModel:
        """The model `save` wrote to `directory`, in eval mode (dropout off). A missing file is a FileNotFoundError;
        a config.json or model.safetensors that is corrupt, belongs to another model or holds non-finite weights is a
        ValueError naming the file and the problem (see `load_weights`)."""
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "model.safetensors"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from None
        model_type = config.pop("model_type", None) if isinstance(config, dict) else None
        if isinstance(config, dict):
            config.pop("metadata", None)
        if model_type != cls.__name__:
            raise ValueError(f"{config_path} has model_type = {model_type!r}: expected {cls.__name__!r}")
        try:
            model = cls.from_config_dict(config)
        except KeyError as error:
            raise ValueError(f"{config_path}: missing key {error}, expected a config written by save") from None
        except (TypeError, ValueError) as error:  # a value of the wrong type or out of range
            raise ValueError(f"{config_path}: {error}") from None
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: missing, expected the weights written by save")
        load_weights(model, weights_path)
        model.eval()  # as transformers' from_pretrained: a loaded model is for use; training calls train() itself
        return model.to(map_location) if map_location is not None else model

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied matrix once); optionally without the embedding tables."""
        skipped = {id(weight) for weight in self._embedding_weights()} if exclude_embeddings else set()
        return sum(parameter.numel() for parameter in self.parameters() if id(parameter) not in skipped)

    def _embedding_weights(self) -> list[nn.Parameter]:
        return [module.weight for module in self.modules() if isinstance(module, nn.Embedding)]

    def configure_optimizers(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.98), fused: bool | None = None
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the weight matrices only: biases, norms and embeddings are not decayed
        (decay would pull rare tokens' embeddings to zero and fight the norms' scale)."""
        embedding_ids = {id(weight) for weight in self._embedding_weights()}
        decayed, not_decayed = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                plain = parameter.dim() < 2 or id(parameter) in embedding_ids
                (not_decayed if plain else decayed).append(parameter)
        if fused is None:
            fused = all(parameter.is_cuda for parameter in decayed + not_decayed)
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def estimate_flops_per_token(self, length: float | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM's estimate (Chowdhery et al. 2022, appendix B):
        6 N for the matrix multiplies over all N parameters (the tied output matrix counts once, as the logits
        matmul; embedding look-ups cost nothing but are few), plus 12 * n_layers * d_model * context for the
        attention scores and their weighted sum, context being the keys per token. `length` is the batch's real
        tokens per sequence (for padded rows, sum(lengths**2) / sum(lengths): each token attends to its own row);
        max_seq_len if not given, which overstates a batch of shorter rows."""
        length = self.config.max_seq_len if length is None else length
        attention = sum(12 * layers * width * context for layers, width, context in self.attention_spans(length))
        return 6 * self.num_params() + attention
