"""Interoperability with other libraries' artifact formats."""
