"""How the compiled extension ``ntksap_fast._C`` is built, loaded and checked."""
