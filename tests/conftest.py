"""Shared pytest set-up: nbval's checked notebook cells tolerate last-digit drift (see nbval_tolerance)."""
from nbval_tolerance import install

install()
