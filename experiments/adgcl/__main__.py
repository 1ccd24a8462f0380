from experiments.adgcl.protocol import main

main()
