"""After retrieve: the val-picked epoch (best), the HTML report (page, charts), comparing
experiments across seeds (compare) and named params recipes to compare against (recipes).

May import: everything below it (foundations, data, ranking, model, retrieve, submit); not train."""
