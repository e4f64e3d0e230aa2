"""cbcore: credit assignment without backprop through hidden layers."""

__version__ = "0.1.0"
