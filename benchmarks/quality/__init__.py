"""Quality benchmark: WordNet "choose the right candidate" tasks for a shared sentence encoder."""
