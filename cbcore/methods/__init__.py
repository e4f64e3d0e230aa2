"""Credit methods behind one interface. Adding a method = one module + one import line here."""

from cbcore.methods import bp, credit_bridge, dfa, state_bridge  # noqa: F401  (registers them)
from cbcore.methods.base import (
    REGISTRY,
    CreditContext,
    CreditMethod,
    CreditOutput,
    check_context,
    check_credits,
    make_method,
    register,
)

__all__ = [
    "REGISTRY",
    "CreditContext",
    "CreditMethod",
    "CreditOutput",
    "check_context",
    "check_credits",
    "make_method",
    "register",
]
