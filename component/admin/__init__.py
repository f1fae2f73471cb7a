"""Ad-hoc commands and statistics for operators (DESIGN 9): not built yet."""
