/*
 * qpcell-detect.groovy -- detect and classify cells with a qpcell model, inside QuPath.
 *
 * QuPath 0.4 to 0.6. Automate > Script editor, open this file, then
 *   "Run"              for the open image, or
 *   "Run for project"  for several images (QuPath saves each one after the script).
 *
 * Where: the selected annotations; if none is selected, every area annotation; if the image
 * has none, the whole image (change REGIONS below to fix one of these).
 * It runs   qpcell predict MODEL IMAGE --out TMP [--regions-file TMP/regions.geojson] [--mpp X]
 * and imports the cells as detections (class, colour, measurements "qpcell: score" and
 * "qpcell: p(<class>)"), each inside the annotation that contains it. qpcell's earlier cells
 * in the same place are removed first; other objects are never touched.
 * Each annotation predicted in gets the read-outs "qpcell: Num <class>", "qpcell: <class> %",
 * "qpcell: <class> per mm^2" and, with POSITIVE_CLASSES, "qpcell: positive %" (the Ki67 index
 * when the classes are Ki67-positive / -negative tumour cells); a rerun replaces only qpcell's
 * measurements. With HOTSPOT_MM2 the hotspots become annotations classified "qpcell hotspot".
 * Every line qpcell prints appears in the log below; "Kill running script" stops qpcell.
 */

import java.nio.file.Files
import java.nio.file.Paths
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit

// ---- settings ---------------------------------------------------------------------------
// The qpcell program of the Python environment qpcell is installed in, as a full path, e.g.
// "/home/me/qpcell/.venv/bin/qpcell" or "C:\\Users\\me\\qpcell\\.venv\\Scripts\\qpcell.exe"
QPCELL = "qpcell"
// The model folder (written by qpcell train): relative to the project folder, or a full path
MODEL = "qpcell-model"
// "auto": selected annotations, else all area annotations, else the whole image;
// "selected", "all" (area annotations) or "whole" (the whole image) to force one
REGIONS = "auto"
// Classes counted positive for "qpcell: positive %", e.g. "Ki67-positive" ("" = none), and
// the negative ones ("" = every other class)
POSITIVE_CLASSES = ""
NEGATIVE_CLASSES = ""
// Hotspot circle area in mm², e.g. 0.5 (null = no hotspot search)
HOTSPOT_MM2 = null
// More options for qpcell predict, e.g. ["--device", "cuda"], or ["--tta", "none"] to run
// the network once per tile instead of on the four flips the model was tuned for (faster)
PREDICT_OPTIONS = []
// -------------------------------------------------------------------------------------------

QPCELL_SCORE = "qpcell: score"
HOTSPOT_CLASS = "qpcell hotspot"

def imageData = getCurrentImageData()
if (imageData == null)
    throw new RuntimeException("qpcell: open an image first")
def server = imageData.getServer()
def uri = server.getURIs() ? server.getURIs().iterator().next() : null
def imagePath = localPath(uri)
if (imagePath == null || !new File(imagePath).isFile())
    throw new RuntimeException("qpcell: the image file is not on this computer (" + uri + ")")
def projectDir = getProject() == null ? null : getProject().getPath().getParent().toFile()
def modelDir = new File(MODEL)
if (!modelDir.isAbsolute()) {
    if (projectDir == null)
        throw new RuntimeException("qpcell: no project open: set MODEL to the model's full path")
    modelDir = new File(projectDir, MODEL)
}
if (!modelDir.exists())
    throw new RuntimeException("qpcell: no model at " + modelDir + " (run qpcell-train.groovy or set MODEL)")

// qpcell's own hotspot circles are never regions
def regions = chooseRegions(REGIONS).findAll { !isHotspot(it) }
def name = getProjectEntry() != null ? getProjectEntry().getImageName() : server.getMetadata().getName()
println "qpcell: " + name + ": " + (regions ? regions.size() + " annotation(s)" : "the whole image")

def work = Files.createTempDirectory("qpcell-").toFile()
try {
    def outDir = new File(work, "out")
    def regionsFile = new File(work, "regions.geojson")
    if (regions)
        exportRegions(regions, regionsFile)
    def calibration = server.getPixelCalibration()
    def mpp = calibration.hasPixelSizeMicrons() ? calibration.getAveragedPixelSizeMicrons() : null

    // >>> qpcell command line (tests/test_groovy.py checks that qpcell accepts these options)
    def predictArgs = ["predict", modelDir.getPath(), imagePath, "--out", outDir.getPath()]
    if (regions)
        predictArgs += ["--regions-file", regionsFile.getPath()]
    if (mpp != null)
        predictArgs += ["--mpp", mpp.toString()]
    if (POSITIVE_CLASSES)
        predictArgs += ["--positive-classes", POSITIVE_CLASSES]
    if (NEGATIVE_CLASSES)
        predictArgs += ["--negative-classes", NEGATIVE_CLASSES]
    if (HOTSPOT_MM2 != null)
        predictArgs += ["--hotspot-mm2", HOTSPOT_MM2.toString()]
    predictArgs += PREDICT_OPTIONS
    // <<< qpcell command line
    runQpcell(predictArgs)

    def results = outDir.listFiles() == null ? [] :
            outDir.listFiles().findAll { it.getName().toLowerCase().endsWith(".geojson") }
    if (results.size() != 1)
        throw new RuntimeException("qpcell: expected one .geojson in " + outDir + ", found " + results.size())

    // replace qpcell's earlier cells: in the chosen annotations, or all of them for the whole image
    def old = getDetectionObjects().findAll { isQpcell(it) && (!regions || insideAny(it, regions)) }
    removeObjects(old, true)
    int before = getDetectionObjects().size()
    importObjectsFromFile(results[0].getPath())
    resolveHierarchy()
    int added = getDetectionObjects().size() - before
    println "qpcell: " + name + ": " + added + " cells added, " + old.size() + " earlier qpcell cells replaced"

    def stem = results[0].getName().substring(0, results[0].getName().length() - ".geojson".length())
    int measured = putMeasurements(new File(outDir, stem + ".measurements.tsv"), regions)
    if (measured) {
        fireHierarchyUpdate()
        println "qpcell: " + name + ": read-outs on " + measured + " annotation(s)"
    }
    def hotspots = new File(outDir, stem + ".hotspots.json")
    if (hotspots.isFile()) {
        removeObjects(getAnnotationObjects().findAll { isHotspot(it) }, true)
        importObjectsFromFile(hotspots.getPath())
        println "qpcell: " + name + ": hotspot annotation(s) added (class \"" + HOTSPOT_CLASS + "\")"
    }
} finally {
    work.deleteDir()
}


// ---- helpers (the same in qpcell-train.groovy) ------------------------------------------

/** The annotations to predict in, by the REGIONS setting ([] = the whole image). */
List chooseRegions(String mode) {
    def areas = { objs -> objs.findAll { it.isAnnotation() && it.getROI() != null && it.getROI().isArea() } }
    def selected = areas(getSelectedObjects() ?: [])
    def all = areas(getAnnotationObjects())
    if (mode == "selected") {
        if (!selected)
            throw new RuntimeException("qpcell: REGIONS is \"selected\" but no area annotation is selected")
        return selected
    }
    if (mode == "all")
        return all
    if (mode == "whole")
        return []
    if (mode != "auto")
        throw new RuntimeException("qpcell: REGIONS must be auto, selected, all or whole, not " + mode)
    return selected ?: all
}

/** Write the regions as unclassified annotations (qpcell reads those as regions); the
 *  user's annotations themselves are not touched. */
void exportRegions(List regions, File file) {
    def pathObjects = Class.forName("qupath.lib.objects.PathObjects", true, getClass().getClassLoader())
    def plain = regions.collect { pathObjects.createAnnotationObject(it.getROI()) }
    exportObjectsToGeoJson(plain, file.getPath(), "FEATURE_COLLECTION")
}

/** The read-outs of <stem>.measurements.tsv (index, region, measurement, value; index i >= 1
 *  is regions[i - 1]) on the regions: qpcell's earlier measurements ("qpcell: ...") are
 *  removed first, the user's stay. Returns the number of annotations changed. */
int putMeasurements(File table, List regions) {
    if (!table.isFile() || !regions)
        return 0
    def byRegion = [:]
    table.readLines("UTF-8").drop(1).each { line ->
        def f = line.split("\t", -1)
        if (f.length == 4 && f[0].isInteger() && f[0].toInteger() >= 1 && f[0].toInteger() <= regions.size())
            byRegion.get(f[0].toInteger(), []).add([f[2], Double.parseDouble(f[3])])
    }
    byRegion.each { i, values ->
        def ml = regions[i - 1].getMeasurementList()
        def stale = ml.getMeasurementNames().findAll { it.startsWith("qpcell: ") }
        if (stale)
            ml.removeMeasurements(stale as String[])
        values.each { ml.put(it[0], it[1]) }
        ml.close()
    }
    return byRegion.size()
}

/** qpcell's hotspot annotations (class "qpcell hotspot"). */
boolean isHotspot(obj) {
    try {
        def pc = obj.getPathClass()
        return pc != null && pc.toString() == HOTSPOT_CLASS
    } catch (MissingMethodException ignored) {
        return false
    }
}

boolean isQpcell(obj) {
    return obj.getMeasurementList().getMeasurementNames().contains(QPCELL_SCORE)
}

static boolean insideAny(obj, List regions) {
    def roi = obj.getROI()
    double x = roi.getCentroidX(), y = roi.getCentroidY()
    return regions.any { it.getROI().contains(x, y) }
}

/** The local file of a file: URI, or null. */
static String localPath(uri) {
    if (uri == null || !"file".equalsIgnoreCase(uri.getScheme()))
        return null
    try {
        return Paths.get(uri).toString()
    } catch (Exception ignored) {
        return null
    }
}

/** Run qpcell with these arguments, every output line to the log; cancellable. */
void runQpcell(List args) {
    List<String> command = [QPCELL.toString()] + args.collect { it.toString() }
    println "qpcell: running " + command.join(" ")
    def builder = new ProcessBuilder(command)
    builder.redirectErrorStream(true)
    def env = builder.environment()
    env.put("PYTHONUNBUFFERED", "1")
    env.put("PYTHONIOENCODING", "utf-8")
    env.put("NO_COLOR", "1")
    env.put("COLUMNS", "120")
    def process
    try {
        process = builder.start()
    } catch (IOException e) {
        throw new RuntimeException("qpcell: cannot start '" + QPCELL + "' (" + e.getMessage() +
                "); set QPCELL at the top of this script to the full path of qpcell")
    }
    def queue = new LinkedBlockingQueue<String>()
    def reader = Thread.start {
        process.getInputStream().withReader("UTF-8") { r ->
            String line
            while ((line = r.readLine()) != null)
                queue.put(line)
        }
    }
    def tail = new LinkedList<String>()
    def show = { String line ->
        println line
        tail.add(line)
        if (tail.size() > 5)
            tail.removeFirst()
    }
    try {
        while (process.isAlive() || reader.isAlive()) {
            if (Thread.currentThread().isInterrupted())
                throw new InterruptedException()
            String line = queue.poll(100, TimeUnit.MILLISECONDS)
            if (line != null)
                show(line)
        }
        reader.join()
    } catch (InterruptedException ignored) {
        process.descendants().toArray().each { it.destroyForcibly() }
        process.destroyForcibly()
        Thread.currentThread().interrupt()
        throw new RuntimeException("qpcell: cancelled; the qpcell process was stopped")
    }
    String rest
    while ((rest = queue.poll()) != null)
        show(rest)
    int code = process.waitFor()
    if (code != 0)
        throw new RuntimeException("qpcell " + args[0] + " failed (exit code " + code + "): " +
                (tail ? tail.join(" | ") : "no output"))
}
