"""Generated data roots in the competition layout: the digits demo the pipeline runs by default
(digits) and the photo/render benchmark domain the benches and tests use (domain).

May import: the foundations only."""
