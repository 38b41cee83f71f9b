"""Shipped data: the synthetic company set and the golden regression set."""
