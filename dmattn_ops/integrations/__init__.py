"""Adapters that plug dmattn_ops into other libraries; each imports its library only when used.

    transformers   dmattn_ops.integrations.transformers.register(): attn_implementation="dmattn"
"""
