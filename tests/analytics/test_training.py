"""A debug training run, asserted from the online metrics: the load-balancing loss keeps the experts
balanced; without it the router drifts to a strongly imbalanced load and the monitor alerts.

Settings (checked on seeds 0-7 before asserting; see the report): OLMoE tiny (E=8, K=2), a small
repetitive corpus (8 fixed 32-token documents over 64 token ids), AdamW with a 5x higher router
learning rate, aux_loss_coef 0.1 on / 0 off, 300 steps; metrics over the last 50 steps.
"""

import torch

import moe_engine as me
from moe_engine.analytics.online import MonitorConfig, RouterMonitor

STEPS, WINDOW = 300, 50


def train(aux_loss_coef: float, seed: int = 0) -> tuple[dict, list]:
    model = me.build_model("olmoe", preset="tiny", seed=seed, router={"aux_loss_coef": aux_loss_coef}).train()
    g = torch.Generator().manual_seed(seed)
    docs_DS = torch.randint(0, 64, (8, 32), generator=g)
    router = [p for n, p in model.named_parameters() if n.endswith("gate.weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("gate.weight")]
    opt = torch.optim.AdamW([{"params": rest, "lr": 1e-2}, {"params": router, "lr": 5e-2}], weight_decay=0.0)
    monitor = RouterMonitor(model, MonitorConfig(imbalance_alert=2.0, dead_fraction_alert=0.5))
    with monitor:
        for step in range(STEPS):
            ids = docs_DS[torch.randint(0, 8, (8,), generator=g)]
            model(input_ids=ids, labels=ids).loss.backward()  # the aux loss rides on the layer outputs
            opt.step()
            opt.zero_grad()
            if step == STEPS - WINDOW - 1:
                monitor.compute()  # drop the warm-up window
        return monitor.compute(), monitor.last_alerts


def test_aux_loss_on_balances_and_off_collapses():
    on, on_alerts = train(aux_loss_coef=0.1)
    off, off_alerts = train(aux_loss_coef=0.0)
    assert on["router/max/load_imbalance"] < 1.5
    assert off["router/mean/load_imbalance"] > 1.8
    assert off["router/mean/load_imbalance"] > 1.5 * on["router/mean/load_imbalance"]
    assert on["router/mean/balance_loss"] < off["router/mean/balance_loss"]  # the unscaled Switch loss
    assert on["router/layer0/aux_loss"] > 0 and off["router/layer0/aux_loss"] == 0
    assert not on_alerts
    assert any(a.metric == "load_imbalance" for a in off_alerts)
