"""The derivatives vaemap writes: one table of output kinds (names, types, whether required),
the products of a fit or a series (arrays and sidecars, computed by plain functions), and their
writing."""
