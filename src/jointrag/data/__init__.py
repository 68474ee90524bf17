"""Data: passages and their store (`corpus`), QA sets (`qa`), dialog sets (`dialog`)."""
