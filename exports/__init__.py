"""Exports of a verified AICert certificate to the formats the ecosystem reads.

A separate part (``pip install aicert[export]``) so that the verifier keeps its five small
dependencies: it reads certificates only through the verifier (``aicert``).
"""
