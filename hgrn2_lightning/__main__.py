from hgrn2_lightning.cli import main

main()
