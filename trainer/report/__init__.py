"""`kdpipe report`: tables, statistics, plots, teacher views, the assumptions table."""
