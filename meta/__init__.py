"""dmattn_ops._meta: the layout rules and the fake implementation of dmattn::varlen_fwd.

Installed under the dmattn_ops namespace (setup.py maps this folder to ``dmattn_ops._meta``); importing it
registers the fake impl and the autograd guard, so dmattn_ops imports it right after loading the library.
"""

from . import fake, rules  # noqa: F401  (registers the fake impl)
from .rules import Layout, VarlenLayout, check_varlen_fwd, layout_of  # noqa: F401
