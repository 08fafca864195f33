"""Record every routing decision of a patched model, for offline analysis as tidy tables.

    rec = RoutingRecorder(model)
    with rec:                                  # or rec.attach() ... rec.detach()
        rec.label(domain="bible")              # labels apply to the forwards that follow
        model(input_ids=ids_BS)
    rec.layer_table()                          # one row per layer (pandas, pandera-validated)
    rec.expert_table()                         # one row per layer x expert

Records are copied to the CPU after each forward (a host sync per layer: fine for analysis, not for
the training step, which :class:`~moe_engine.analytics.online.RouterMonitor` serves). Tokens ``T``
are the flattened batch * sequence positions; the token ids come from the model's ``input_ids``
(``decoder_input_ids`` for the decoder layers of encoder-decoder models). Shape legend in
``metrics.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_engine.analytics import metrics as M


@dataclass
class LayerRecord:
    """One layer's routing in one forward, on the CPU."""

    batch: int
    expert_idx_A: torch.Tensor
    weight_A: torch.Tensor
    token_idx_A: torch.Tensor | None
    probs_TE: torch.Tensor
    lse_T: torch.Tensor  # logsumexp of the router logits (enough for the z-loss)
    num_experts: int
    top_k: int
    token_ids_T: torch.Tensor | None
    labels: dict = field(default_factory=dict)
    aux_losses: dict = field(default_factory=dict)  # as the router scaled them (training forwards only)

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]


@dataclass
class LayerData:
    """A layer's records concatenated over forwards (token positions follow the recording order)."""

    layer: int
    name: str
    num_experts: int
    top_k: int
    expert_idx_A: torch.Tensor
    member_TE: torch.Tensor  # experts that processed each token
    chosen_TE: torch.Tensor  # experts each token chose, before any capacity drop
    weight_TE: torch.Tensor
    probs_TE: torch.Tensor
    lse_T: torch.Tensor
    batch_T: torch.Tensor
    token_ids_T: torch.Tensor | None  # None if any forward had no input_ids (e.g. inputs_embeds)
    labels_T: dict[str, list]  # label name -> one value per token (None where unlabelled)

    @property
    def num_tokens(self) -> int:
        return self.member_TE.shape[0]

    @property
    def counts_E(self) -> torch.Tensor:
        return self.member_TE.sum(0)


def _choices(r: LayerRecord) -> torch.Tensor:
    """long [A]: each assignment's expert before a capacity drop. A capacity router (Switch) drops
    after choosing the top-k of its probabilities in order, so a dropped slot k held the k-th best."""
    dropped_A = r.expert_idx_A == r.num_experts
    if r.token_idx_A is not None or r.probs_TE.shape[1] != r.num_experts or not dropped_A.any():
        return r.expert_idx_A
    best_A = r.probs_TE.topk(r.top_k, dim=-1).indices.reshape(-1)
    return torch.where(dropped_A, best_A, r.expert_idx_A)


def _decoder_layer(name: str) -> bool:
    return name.startswith("decoder.") or ".decoder." in name


class RoutingRecorder:
    """Attach to any model with engine MoE layers; see the module docstring."""

    def __init__(self, model: nn.Module, keep_probs: bool = True):
        from moe_engine.models.adapters import moe_layers

        self.model = model
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("model has no engine MoE layers; build it with me.build_model or me.patch")
        names = {id(m): n for n, m in model.named_modules()}
        self.names = [names.get(id(m), f"layer{i}") for i, m in enumerate(self.layers)]
        self.keep_probs = keep_probs
        self.records: list[list[LayerRecord]] = [[] for _ in self.layers]
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._labels: dict = {}
        self._inputs: dict[str, torch.Tensor | None] = {}
        self._batch = -1
        self._handles: list = []
        self._cache: dict[int, tuple[int, LayerData]] = {}  # layer -> (records seen, data)

    # -- collection ------------------------------------------------------------------------------
    def attach(self) -> "RoutingRecorder":
        if self.model is None:
            raise ValueError("this recorder was closed; make a new one to record again")
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)]
            self._handles += [layer.register_routing_hook(self._hook) for layer in self.layers]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """Detach and drop the references to the model (the records stay), so a recorder kept for
        analysis does not keep the model's weights alive."""
        self.detach()
        self.model, self.layers = None, []

    def __enter__(self) -> "RoutingRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def label(self, **labels) -> None:
        """Labels (e.g. ``domain="bible"``) for every token of the forwards that follow."""
        self._labels = dict(labels)

    def clear(self) -> None:
        self.records = [[] for _ in self.names]
        self._cache = {}
        self._batch = -1

    def _pre_forward(self, module, args, kwargs):
        self._batch += 1
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self._inputs = {"encoder": ids, "decoder": kwargs.get("decoder_input_ids")}

    @torch.no_grad()
    def _hook(self, layer, routing, counts_E) -> None:
        i = self._index[id(layer)]
        ids = self._inputs.get("decoder" if _decoder_layer(self.names[i]) else "encoder")
        token_ids_T = ids.reshape(-1).cpu() if ids is not None and ids.numel() == routing.num_tokens else None
        probs_TE = routing.probs_TE.detach().float().cpu()
        self.records[i].append(
            LayerRecord(
                batch=max(self._batch, 0),
                expert_idx_A=routing.expert_idx_A.detach().cpu(),
                weight_A=routing.weight_A.detach().float().cpu(),
                token_idx_A=None if routing.token_idx_A is None else routing.token_idx_A.detach().cpu(),
                probs_TE=probs_TE if self.keep_probs else probs_TE[:, :0],
                lse_T=torch.logsumexp(routing.logits_TE.detach().float(), -1).cpu(),
                num_experts=routing.num_experts,
                top_k=routing.top_k,
                token_ids_T=token_ids_T,
                labels=dict(self._labels),
                aux_losses={k: float(v) for k, v in routing.aux_losses.items()},
            )
        )

    # -- concatenated views ----------------------------------------------------------------------
    def layer_data(self, layer: int) -> LayerData:
        recs = self.records[layer]
        if not recs:
            raise ValueError(f"nothing recorded for layer {layer} ({self.names[layer]}): run a forward inside the recorder")
        cached = self._cache.get(layer)
        if cached is None or cached[0] != len(recs):
            self._cache[layer] = (len(recs), self._concat(layer, recs))
        return self._cache[layer][1]

    def _concat(self, layer: int, recs: list[LayerRecord]) -> LayerData:
        num_experts, top_k = recs[0].num_experts, recs[0].top_k
        members, chosen, weights = [], [], []
        for r in recs:
            member_TE = M.membership(r.expert_idx_A, num_experts, r.num_tokens, top_k, r.token_idx_A)
            chosen.append(M.membership(_choices(r), num_experts, r.num_tokens, top_k, r.token_idx_A))
            token_A = M.token_index(r.expert_idx_A.numel(), top_k, r.token_idx_A)
            weight_TE = torch.zeros(r.num_tokens, num_experts + 1)
            weight_TE.index_put_((token_A, r.expert_idx_A), r.weight_A, accumulate=True)
            members.append(member_TE)
            weights.append(weight_TE[:, :num_experts])
        label_names = sorted({k for r in recs for k in r.labels})
        have_ids = all(r.token_ids_T is not None for r in recs)
        return LayerData(
            layer=layer,
            name=self.names[layer],
            num_experts=num_experts,
            top_k=top_k,
            expert_idx_A=torch.cat([r.expert_idx_A for r in recs]),
            member_TE=torch.cat(members),
            chosen_TE=torch.cat(chosen),
            weight_TE=torch.cat(weights),
            probs_TE=torch.cat([r.probs_TE for r in recs]),
            lse_T=torch.cat([r.lse_T for r in recs]),
            batch_T=torch.cat([torch.full((r.num_tokens,), r.batch) for r in recs]),
            token_ids_T=torch.cat([r.token_ids_T for r in recs]) if have_ids else None,
            labels_T={k: [r.labels.get(k) for r in recs for _ in range(r.num_tokens)] for k in label_names},
        )

    def recorded_layers(self) -> list[int]:
        return [i for i, recs in enumerate(self.records) if recs]

    def same_stack(self, a: int, b: int) -> bool:
        """Layers ``a`` and ``b`` see the same tokens (not an encoder and a decoder layer)."""
        return _decoder_layer(self.names[a]) == _decoder_layer(self.names[b])

    # -- tables (see tables.py) ------------------------------------------------------------------
    def layer_table(self):
        from moe_engine.analytics import tables

        return tables.layer_table(self)

    def expert_table(self):
        from moe_engine.analytics import tables

        return tables.expert_table(self)

    def assignment_table(self):
        from moe_engine.analytics import tables

        return tables.assignment_table(self)

    def coactivation_table(self):
        from moe_engine.analytics import tables

        return tables.coactivation_table(self)

    def specialisation_table(self, by: str = "domain"):
        from moe_engine.analytics import tables

        return tables.specialisation_table(self, by)

    def token_table(self, min_count: int = 1):
        from moe_engine.analytics import tables

        return tables.token_table(self, min_count)

    def consistency_table(self):
        from moe_engine.analytics import tables

        return tables.consistency_table(self)

    def metrics(self, prefix: str = "router") -> dict[str, float]:
        """Flat ``{"router/layer{i}/{metric}": float}`` from :meth:`layer_table`, for logging."""
        table = self.layer_table()
        skip = {"layer", "name", "num_experts", "top_k"}
        return {
            f"{prefix}/layer{row['layer']}/{k}": float(v)
            for row in table.to_dict("records")
            for k, v in row.items()
            if k not in skip and v == v  # NaN (no next layer) is not a loggable value
        }
