package nbdstore

import "github.com/wanmotion/wanmotion/nbd"

type nbdExtent = nbd.Extent

const nbdHoleZero = nbd.ExtentHole | nbd.ExtentZero
