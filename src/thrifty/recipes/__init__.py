"""Recipes: whole pipelines of Thrifty's trainers, run by one command (`thrifty recipe NAME`)."""
