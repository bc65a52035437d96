"""smp encoder names, checked when params load (pipeline.core.config) and when a model is built
(pipeline.models): one message, with close matches, for both."""

from __future__ import annotations


def check_encoder(name: str) -> None:
    """ValueError naming close matches unless `name` is an smp encoder (params validate
    `encoder` with it when they load, long before a stage builds the model)."""
    import difflib

    from segmentation_models_pytorch.encoders import encoders

    if name not in encoders:
        close = difflib.get_close_matches(name, list(encoders), n=3, cutoff=0.6)
        examples = close or ["resnet34", "efficientnet-b0", "mobilenet_v2"]
        raise ValueError(
            f"unknown encoder {name!r}: 'none' (the classic one) or an smp encoder, "
            f"e.g. {', '.join(examples)} ({len(encoders)} in all)"
        )
