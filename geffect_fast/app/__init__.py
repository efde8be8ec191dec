"""The application above the library: the ``geffect-fast`` command line (:mod:`.cli`), the demo (:mod:`.demo`), the
paper's protocol on a real model (:mod:`.reproduce`), the fine-tune / unlearn loops they run (:mod:`.pipeline`), the
reports they write (:mod:`.report`, reading runs through :mod:`.records`, drawing with :mod:`.figures`), the names of
the objectives they offer (:mod:`.catalog`, torch-free), and what they share (:mod:`.common`).

It imports the library (``geffect_fast``); the library never imports it.
"""
