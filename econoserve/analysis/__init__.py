"""Analysis: metrics over result tables, and one function per figure."""
