"""`rtnf info --preset NAME`: a model preset's architecture and parameter counts."""

from __future__ import annotations

from typing import Any

from rtnf.config import Config
from rtnf.model.neuroformer import Neuroformer
from rtnf.model.spec import dims_from_config, spec_from_config

STAGES = {
    "embeddings": ("special_embedding", "session_embedding", "current_dt", "current_position"),
    "current (causal self-attention)": ("current_blocks",),
    "history (cross-attention)": ("history_blocks",),
    "frames (tokenizer + encoder + cross-attention)": ("frame_tokenizer", "frame_encoder",
                                                        "frame_blocks"),
    "behaviour inputs (cross-attention)": ("behavior_tokenizer", "behavior_blocks"),
    "decoder (causal self-attention)": ("decoder_blocks", "final_norm"),
    "heads": ("special_output", "dt_head", "behavior_head", "rate_projection",
              "contrastive_projection"),
    "unit tables (grow with units)": ("unit_embedding", "unit_output", "unit_rate"),
}


def model_summary(config: Config, n_units: int) -> dict[str, Any]:
    """Architecture and parameters of `config.model` sized for `n_units` units and the
    simulated rig's stimulus (config.simulation's frame size and rate)."""
    spec = spec_from_config(config)
    simulation = config.simulation
    dims = dims_from_config(config, (simulation.frame_height, simulation.frame_width),
                            simulation.frame_rate, spec)
    model = Neuroformer(spec, dims, n_units=n_units, n_sessions=1)
    stages = {stage: sum(p.numel() for name in names if getattr(model, name) is not None
                         for p in getattr(model, name).parameters())
              for stage, names in STAGES.items()}
    per_unit = 3 * spec.n_embd + 1  # a row of unit_embedding, unit_output and unit_rate
    return {"preset": config.model.preset, "parameters": model.parameter_count(),
            "units": n_units, "parameters_per_unit": per_unit,
            "parameters_without_units": model.parameter_count() - n_units * per_unit,
            "stages": stages, "spec": spec.to_dict(), "dims": dims.to_dict()}


def format_model_summary(summary: dict[str, Any]) -> str:
    spec, dims = summary["spec"], summary["dims"]
    lines = [
        f"preset        {summary['preset']}: {summary['parameters'] / 1e6:.2f}M parameters "
        f"for {summary['units']} units ({summary['parameters_without_units'] / 1e6:.2f}M + "
        f"{summary['parameters_per_unit']} per unit)",
        f"width         n_embd {spec['n_embd']}, {spec['n_head']} heads, MLP x{spec['mlp_ratio']}, "
        f"dropout {spec['dropout']}",
        f"blocks        current {spec['n_current_layers']}, history {spec['n_history_layers']}, "
        f"frame encoder {spec['n_frame_encoder_layers']}, frames {spec['n_frame_layers']}, "
        f"behaviour {spec['n_behavior_layers']}, decoder {spec['n_decoder_layers']}",
        f"windows       current {dims['current_bins']} bins (capacity "
        f"{dims['current_capacity']}), history {dims['history_bins']} bins (capacity "
        f"{dims['history_capacity']})",
        f"stimulus      clip {dims['frame_shape']}, Conv3d kernel {tuple(spec['frame_kernel'])}",
        f"behaviour     targets {', '.join(dims['behavior_targets']) or '-'}; inputs "
        f"{', '.join(dims['behavior_inputs']) or '-'} ({dims['objective']})",
    ]
    lines += [f"  {stage:<48} {count / 1e6:8.3f}M" for stage, count in summary["stages"].items()]
    return "\n".join(lines)
