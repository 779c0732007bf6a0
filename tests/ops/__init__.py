"""Tests of recipekit/ops (a package, so test_merge.py may share its name with tests/steps/)."""
