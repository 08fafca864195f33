"""The MoE layer: routers (router.py), what they decide (routing.py), aux losses (losses.py),
token dispatch (dispatch.py), expert weights and grouped GEMMs (experts.py), the layer (layer.py)."""
