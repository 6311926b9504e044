import sys


def main(argv):
	if len(argv) > 1:
		name = argv[1]
	else:
		name = "world"
	print("hello", name)
	return 0


if __name__ == "__main__":
	sys.exit(main(sys.argv))
